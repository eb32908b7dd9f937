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
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    # headers: csrc's own, and the device code of vtprune/kernels/src that csrc/cuda/*.cu includes (the one copy,
    # shared with the NVRTC back end); as depends they are rebuilt on change and shipped in the sdist
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    depends += sorted(glob.glob(os.path.join("vtprune", "kernels", "src", "*.cuh")))
    flags = {"extra_compile_args": ["-O3", "-fopenmp"], "extra_link_args": ["-fopenmp"], "depends": depends}
    # CUDA kernels only on request: nvcc takes minutes here, the CPU build seconds (see README, native ops)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if os.environ.get("VTPRUNE_CUDA") == "1" and torch.version.cuda and CUDA_HOME and cuda_sources:
        flags["extra_compile_args"] = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]}
        ext = CUDAExtension("vtprune._C", sources + cuda_sources, **flags)
    else:
        ext = CppExtension("vtprune._C", sources, **flags)

    class OptionalBuildExtension(BuildExtension.with_options(no_python_abi_suffix=True)):
        """A failed native build never fails the install: vtprune then JIT-builds or uses pure torch."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # compiler missing or broken toolchain
                print(
                    f"WARNING: vtprune native ops not built ({type(exc).__name__}: {exc}); "
                    "vtprune will JIT-build them on first use or fall back to pure torch"
                )

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
