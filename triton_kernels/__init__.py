"""Triton kernels of mmkernels, installed as ``mmkernels._triton``.

Only ``@triton.jit`` code lives here, one module per op family; nothing here imports from
``mmkernels``. Launchers, autograd and the public API are in ``mmkernels/ops/<family>.py``.
"""
