"""Build script.

A plain install (``pip install .``) is pure Python: the Triton kernels compile at run time and no
compiler or CUDA toolkit is needed. The C++ CPU kernels in ``csrc/`` are built only when asked:

    MMKERNELS_BUILD_CSRC=1 pip install --no-build-isolation -e .

(they need torch's C++ headers, pybind11 and ninja at build time).
"""
import glob
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("MMKERNELS_BUILD_CSRC", "0") != "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        raise SystemExit("MMKERNELS_BUILD_CSRC=1 but csrc/ has no .cpp sources")
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the flags of mmkernels._cpp.CFLAGS (the just-in-time build): -fopenmp for at::parallel_for
    # (inline OpenMP), -fno-trapping-math so that loops with float selects vectorise
    cflags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    ext = CppExtension("mmkernels._C", sources, extra_compile_args=cflags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
