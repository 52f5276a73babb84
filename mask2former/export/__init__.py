"""ONNX export of the inference model and the proofs that a converted model matches PyTorch.

- ``onnx_export``: trace :class:`~mask2former.runtime.inference_model.InferenceModel` into ONNX (input
  ``inputs``, the fixed output names of the mode, dynamic or fixed batch);
- ``simplify``: onnxslim, keeping the exported graph when simplification fails;
- ``parity``: compare two runtimes' named outputs on the same inputs (also used by gen_trt_engine);
- ``metadata``: the model record (mode, classes, label map) stored in the ONNX file.

The export action is ``mask2former.actions.export``.
"""
