"""cffi builder for ``llama_broker._sse`` (out-of-line API mode).

The C headers ``csrc/lb_sse.h`` (the SSE splitter) and ``csrc/lb_json.h``
(the chunk fast path) are the contract: their declarations are the cdef,
with the include guards and ``#include`` lines dropped.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_HERE), "csrc")


def _cdef_from_header(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    keep = []
    for line in text.splitlines():
        if re.match(r"\s*#\s*(ifndef|endif|include)\b", line):
            continue
        if re.match(r"\s*#\s*define\s+LB_\w+_H\s*$", line):
            continue
        keep.append(line)
    return "\n".join(keep)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(os.path.join(_CSRC, "lb_sse.h")))
ffibuilder.cdef(_cdef_from_header(os.path.join(_CSRC, "lb_json.h")))
ffibuilder.set_source(
    "llama_broker._sse",
    '#include "lb_sse.h"\n#include "lb_json.h"',
    sources=[os.path.relpath(os.path.join(_CSRC, f)) for f in ("lb_sse.c", "lb_json.c")],
    include_dirs=[os.path.relpath(_CSRC)],
    extra_compile_args=["-O2", "-std=c99"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
