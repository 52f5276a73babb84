"""Run a TensorRT engine (runner kind ``engine``) through the TensorRT 10 tensor API, with torch CUDA
tensors as the I/O buffers::

    context.set_input_shape(input, images.shape)
    context.set_tensor_address(name, tensor.data_ptr())      # input and every output
    context.execute_async_v3(torch.cuda.current_stream().cuda_stream)

The input size is fixed by the engine's optimisation profile (H x W); the batch ranges over the
profile's min..max (smaller batches are zero-padded to the minimum). Needs a CUDA GPU and the
``tensorrt`` package; otherwise loading fails with one sentence.

An engine written encrypted (gen_trt_engine with ``encryption_key``) is decrypted in memory and handed to
``runtime.deserialize_cuda_engine(bytes)``: the plaintext engine never touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import crypto
from ..errors import ActionError
from .inference_model import output_names
from .onnx_runner import INTEGER_OUTPUTS, mode_of_outputs

NEEDS = "Running a TensorRT engine needs a CUDA GPU and the tensorrt package (requirements-gpu.txt)"


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT DataType."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, value in table.items():
        if getattr(trt.DataType, name, None) is not None and dtype == getattr(trt.DataType, name):
            return value
    raise ActionError(f"The engine uses the TensorRT data type {dtype}, which has no torch equivalent here.")


@dataclass
class EngineIO:
    """The I/O of a deserialised engine."""

    input_name: str
    min_shape: Tuple[int, ...]
    max_shape: Tuple[int, ...]
    outputs: List[str]
    mode: str

    @property
    def fixed_input_size(self) -> Tuple[int, int]:
        return int(self.max_shape[2]), int(self.max_shape[3])


def describe_engine(engine: Any, trt: Any, *, path: str = "engine") -> EngineIO:
    """Input name and profile range, output names and the mode they imply, of ``engine``."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    if len(inputs) != 1:
        raise ActionError(f"The engine '{path}' has inputs {inputs}; expected one image input.")
    low, _, high = (tuple(int(d) for d in shape) for shape in engine.get_tensor_profile_shape(inputs[0], 0))
    if len(high) != 4 or low[1:] != high[1:]:
        raise ActionError(f"The engine '{path}' profile of '{inputs[0]}' spans {low}..{high}; expected [B, C, H, W] "
                          "with fixed C, H and W.")
    try:
        mode = mode_of_outputs(outputs)
    except ValueError as exc:
        raise ActionError(f"The engine '{path}': {exc}") from exc
    return EngineIO(input_name=inputs[0], min_shape=low, max_shape=high, outputs=outputs, mode=mode)


def deserialize_engine(runtime: Any, path: Union[str, Path], *, encryption_key: Optional[str] = None) -> Any:
    """``runtime.deserialize_cuda_engine`` of the engine file at ``path``, decrypted in memory when it is
    encrypted; a missing or wrong key, or an engine TensorRT refuses, is an ActionError naming the file."""
    try:
        data = crypto.open_model_bytes(path, encryption_key)
    except crypto.EncryptionError as exc:
        raise ActionError(str(exc)) from None
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ActionError(f"TensorRT cannot deserialise '{path}' (built by another TensorRT version or for another "
                          "GPU? rebuild it with gen_trt_engine on this machine).")
    return engine


class TensorRTRunner:
    """A deserialised engine behind the runner call form (see mask2former.runtime)."""

    def __init__(self, path: Union[str, Path], *, device: Union[str, torch.device] = "cuda:0",
                 trt: Optional[Any] = None, encryption_key: Optional[str] = None) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ActionError(f"{NEEDS}; this machine has no CUDA GPU (or the job's device is {self.device}).")
        if trt is None:
            try:
                import tensorrt as trt
            except ImportError:
                raise ActionError(f"{NEEDS}; tensorrt is not installed.") from None
        self.trt = trt
        self.path = Path(path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = deserialize_engine(self.runtime, self.path, encryption_key=encryption_key)
            self.context = self.engine.create_execution_context()
        self.io = describe_engine(self.engine, trt, path=str(self.path))
        self.mode = self.io.mode
        self.fixed_input_size: Optional[Tuple[int, int]] = self.io.fixed_input_size
        self.max_batch_size: Optional[int] = int(self.io.max_shape[0])
        self.min_batch_size = int(self.io.min_shape[0])
        self.dtypes = {name: torch_dtype(trt, self.engine.get_tensor_dtype(name))
                       for name in [self.io.input_name] + self.io.outputs}
        sem_shape = self.engine.get_tensor_shape("sem_scores")
        self.num_classes = int(sem_shape[1])

    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        expected = self.io.max_shape[1:]
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(expected):
            raise ValueError(f"'{self.path.name}' takes images [B, {expected[0]}, {expected[1]}, {expected[2]}]; got "
                             f"{tuple(images.shape)}: resize and pad to the runner's fixed_input_size")
        count = images.shape[0]
        if count > self.max_batch_size:
            raise ValueError(f"'{self.path.name}' takes at most {self.max_batch_size} images per call; got {count}")
        batch = images.to(self.device, dtype=self.dtypes[self.io.input_name])
        if count < self.min_batch_size:
            pad = batch.new_zeros((self.min_batch_size - count,) + tuple(batch.shape[1:]))
            batch = torch.cat([batch, pad], dim=0)
        batch = batch.contiguous()
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            self.context.set_input_shape(self.io.input_name, tuple(batch.shape))
            self.context.set_tensor_address(self.io.input_name, batch.data_ptr())
            outputs: Dict[str, torch.Tensor] = {}
            for name in self.io.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run '{self.path.name}' on a batch of {tuple(batch.shape)}")
        result = {}
        for name in output_names(self.mode):
            tensor = outputs[name][:count]
            result[name] = tensor.long() if name in INTEGER_OUTPUTS else tensor.float()
        return result


def load(path: Union[str, Path], config: Any, device: torch.device) -> TensorRTRunner:
    """Runner loader of kind 'engine' (see mask2former.runtime.load_runner)."""
    return TensorRTRunner(path, device=device, encryption_key=getattr(config, "encryption_key", None))
