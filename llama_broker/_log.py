"""The package's logger, made on first use: ``import llama_broker`` does not import ``logging``.

``log.warning(...)`` (and every other ``logging.Logger`` attribute) goes to
``logging.getLogger("llama_broker")``, which gets its ``NullHandler`` when
it is first reached: a library logs, the application decides where it goes
(without a handler of its own, Python's last-resort handler would print our
warnings to stderr).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import logging

__all__ = ["log", "logger"]

NAME = "llama_broker"
_logger: Optional["logging.Logger"] = None


def logger() -> "logging.Logger":
    """``logging.getLogger("llama_broker")``, with its ``NullHandler`` attached (once)."""
    global _logger
    if _logger is None:
        import logging

        lg = logging.getLogger(NAME)
        if not any(type(h) is logging.NullHandler for h in lg.handlers):
            lg.addHandler(logging.NullHandler())
        _logger = lg
    return _logger


class _LazyLogger:
    """Stands for the package's logger until first use (``log.warning(...)``)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(logger(), name)


#: the package's logger (a stand-in that imports ``logging`` on first use)
log: "logging.Logger" = _LazyLogger()  # type: ignore[assignment]

if "logging" in sys.modules:  # already paid for: attach the handler now, as before
    logger()
