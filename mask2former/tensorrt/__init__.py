"""TensorRT engine generation, written against the TensorRT Python API (TensorRT 10).

- ``plan``: the build plan (input profile, precision flags, workspace, timing cache), plain Python;
- ``precision``: which ONNX nodes an FP16 engine keeps in FP32, and how TensorRT layers map to nodes;
- ``builder``: executes a plan through a ``tensorrt`` module (the real one on a GPU machine).

Nothing here imports ``tensorrt`` at module level: the module is passed in, or imported by
:func:`~mask2former.tensorrt.builder.require_tensorrt` after the CUDA check. The runner is
``mask2former.runtime.tensorrt_runner``; the action is ``mask2former.actions.gen_trt_engine``.
"""
