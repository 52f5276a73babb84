"""Post-training quantization of Mask2Former checkpoints.

Backends (``quantize.backend``):

- ``torchao`` (default, CPU): int8 weight-only quantization of the Linear layers through
  ``torchao.quantization.quantize_(model, Int8WeightOnlyConfig(), filter_fn=...)``; the weights are
  stored as int8, so the file shrinks to about a quarter.
- ``modelopt.pytorch``: NVIDIA ModelOpt fake quantization (int8 or fp8, weight-only or static with
  calibration) through ``modelopt.torch.quantization.quantize``, for deployment through ONNX/TensorRT.
- ``modelopt.onnx``: Q/DQ ONNX through ``modelopt.onnx.quantization.quantize`` on an exported model with
  calibration images.

Module selection is shared (:mod:`.selection`); the artifact format and its loader are in
:mod:`.artifact`; the action is ``mask2former.actions.quantize``.
"""

BACKENDS = ("torchao", "modelopt.pytorch", "modelopt.onnx")
