"""Which llama_broker the tests import, and whether that is the installed one.

``make test`` runs the suite against the wheel installed in a clean virtual
environment, with ``LLAMA_BROKER_TEST_INSTALLED=1``; conftest.py then refuses
to run when ``llama_broker`` would come from anywhere but that environment's
site-packages (a checkout on ``sys.path``, an editable install).
"""

from __future__ import annotations

import os
import sysconfig
from typing import Iterable, List, Optional

ENV = "LLAMA_BROKER_TEST_INSTALLED"


def site_dirs() -> List[str]:
    """This interpreter's site-packages directories (purelib, platlib)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])})


def installed_problem(pkg_file: str, sites: Iterable[str], test_root: str) -> Optional[str]:
    """Why ``pkg_file`` (``llama_broker.__file__``) is not an installed copy, or None.

    Installed means: the package directory sits directly in one of ``sites``,
    and the test tree ``test_root`` holds no ``llama_broker`` package of its own.
    """
    pkg_dir = os.path.dirname(os.path.realpath(pkg_file))
    if os.path.dirname(pkg_dir) not in {os.path.realpath(s) for s in sites}:
        return f"llama_broker is imported from {pkg_dir}, not from site-packages ({', '.join(sites)})"
    local = os.path.join(os.path.realpath(test_root), "llama_broker")
    if os.path.isdir(local):
        return f"the test tree has its own {local}: tests could import it instead of the installed package"
    return None
