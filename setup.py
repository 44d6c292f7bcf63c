"""Build glue: compiles csrc/ into llama_broker._sse through cffi.

cffi builds the extension against the stable ABI (``_sse.abi3.so``); the
``bdist_wheel`` option below tags the wheel ``cp39-abi3`` so one wheel per
platform serves every CPython from 3.9 on.
"""

import platform

from setuptools import setup

options = {}
if platform.python_implementation() == "CPython":
    options["bdist_wheel"] = {"py_limited_api": "cp39"}

setup(cffi_modules=["llama_broker/_sse_build.py:ffibuilder"], options=options)
