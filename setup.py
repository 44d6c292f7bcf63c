"""Build glue: compiles csrc/ into llama_broker._sse through cffi."""

from setuptools import setup

setup(cffi_modules=["llama_broker/_sse_build.py:ffibuilder"])
