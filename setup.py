"""Builds vtprune's native ops (csrc/) when there are any and torch is importable at build time.

Metadata lives in pyproject.toml. A plain ``pip install .`` never fails because of the extension: without
torch at build time, or without sources, the package installs pure-Python and falls back to torch code.
Use ``pip install --no-build-isolation -e .`` (as the Makefile does) so the build sees the installed torch.
"""

import glob
import os

from setuptools import setup


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("VTPRUNE_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    ext = CppExtension("vtprune._C", sources, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
