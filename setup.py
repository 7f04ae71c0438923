# The package metadata lives in pyproject.toml; this file only hooks in the cffi extension.
from setuptools import setup

setup(cffi_modules=["scheduler/build_cffi.py:ffibuilder"])
