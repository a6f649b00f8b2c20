"""Build script: the package, plus the C++/CUDA extension staged_fast._C when its sources exist."""
from setuptools import setup

setup()
