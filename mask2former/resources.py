"""Running out of GPU memory, host memory or disk: a message that says what ran out and which spec keys help,
and an estimate of training memory checked against the device before training starts.

Failures. :func:`classify_resource_error` recognises, anywhere in an exception's cause/context chain or in
its text (a worker's error arrives as text):

* GPU memory: ``torch.cuda.OutOfMemoryError`` / ``torch.OutOfMemoryError``, "CUDA out of memory",
  "CUDA error: out of memory", cuBLAS/cuDNN allocation failures;
* host memory: ``MemoryError``, "DefaultCPUAllocator: can't allocate memory", "not enough memory",
  ``OSError`` ENOMEM, a data-loader worker killed by SIGKILL (the kernel's OOM killer);
* disk: ``OSError`` ENOSPC / EDQUOT, "No space left on device", "Disk quota exceeded", and the torch
  archive writer's failures ("PytorchStreamWriter failed writing", "unexpected pos N vs M"), which are
  what ``torch.save`` raises on a full disk.

Memory estimate. :func:`estimate_training_memory` adds, per training process:

* parameters, gradients and AdamW's two moments: 4 + 4 + 8 bytes per parameter (parameters counted from
  the architecture keys by :func:`count_parameters`, exactly as :func:`mask2former.model.build_model`
  builds them), plus 2 bytes per parameter of half-precision copies under fp16/bf16 autocast;
* activations kept for the backward pass, per image, from the padded crop ``H x W`` (tokens ``N_s`` at
  stride ``4 * 2^s``, window-padded ``Np_s``; stage widths ``C_s``, depths ``d_s``, heads ``h_s``, window
  ``w``), in float32 elements::

      backbone          12.78 * sum_s d_s N_s C_s + 4.92 * sum_s d_s Np_s w^2 h_s
                        (use_checkpoint: 3.26 * sum_s d_s N_s C_s, plus one block recomputed at a time)
      pixel decoder     18.76 * L N_e D + 1.26 * L N_e 1024 + 2.86 * N_0 (D + mask_dim)
                        (L encoder layers over N_e = N_1 + N_2 + N_3 tokens, D = convs_dim)
      decoder           0.63 * P Q N_0 + 0.55 * P Q N_l heads + 26.47 * P Q hidden
                        (P = dec_layers predictions, N_l = mean of N_1, N_2, N_3)
      criterion         7.49 * P' T points    (P' = P with deep supervision else 1, T masks per image)

  An EfficientViT backbone (``model.backbone.type: efficientvit``) keeps ``a_v * H * W`` elements
  (``use_checkpoint``: ``c_v * H * W`` plus one stage recomputed at a time), with per-variant ``a_v``/``c_v``
  counted with ``saved_tensors_hooks`` on the meta device at 256x256 and 256x512 (parameters excluded;
  the network is convolutional and its attention linear, so the count scales with the pixels);
  its parameters are counted per variant. Under fp16/bf16 the backbone term is multiplied by 0.80 and the decoder term by 1.47 (measured with CPU
  bf16 autocast: casts are kept beside float32 inputs); the pixel decoder and the loss stay float32;
* the backward pass's transient buffers, 0.35 x the activations, and the runtime itself (kernels, allocator
  caches: 134 MB on CPU; 1 GiB assumed on CUDA for the context, cuBLAS/cuDNN workspaces and fragmentation).

Calibration (this 2-core CPU, torch 2.13, one thread, two AdamW steps; "saved" = bytes of tensors saved for
backward counted with ``torch.autograd.graph.saved_tensors_hooks``, "peak" = peak RSS minus the RSS before
the model was built). The activation coefficients were fitted on the saved bytes of 9 configurations (tiny:
Swin embed 32, depths [1,1,1,1], hidden 64, 20 queries, 4 predictions; small: embed 64, depths [2,2,2,2],
hidden 128, 50 queries, 6 predictions; Swin-T with the full default head; crops 128 to 384, batch 1 to 4,
5 to 20 masks): every component within 10 % (backbone -10 %..+1 %, pixel decoder exact, criterion
-5 %..+6 %; the decoder term, a few MB, within 31 %). The peak RSS of 13 configurations (those 9, bf16,
use_checkpoint, 1000 points, 100 queries x 10 predictions) then fitted the runtime constant and the transient
factor: the estimate is within -9 %..+13 % of every one (the tiny ones, where the runtime constant dominates,
are the worst; Swin-T at 256 and 384 px: +0.4 %, +2.8 %). Held out from every fit: Swin-T at 512 px +0.4 %
(3.13 GB measured), a tiny model with window 8 at 192x160, batch 3, -0.8 %, the small one with 6 encoder
layers and no deep supervision at 320x256, batch 2, -4.1 %. The documented bound is **15 %**;
tests/test_resources.py measures a tiny and a small configuration again. Not covered: memory of
validation, data-loader workers (each a process of ~200-300 MB on the host), DDP gradient buckets
(another 4 bytes per parameter per process) and CUDA itself, which was not measured here: treat GPU
numbers as a guide with a 25 % margin (:func:`check_fits` warns at 90 % of free memory).

No torch import at module level: operators may import this module at DAG-parse time.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DEFAULT_MASKS_PER_IMAGE",
    "MemoryEstimate",
    "ResourceFailure",
    "available_memory",
    "check_fits",
    "classify_resource_error",
    "count_parameters",
    "estimate_training_memory",
    "memory_levers",
]

GPU_MEMORY, HOST_MEMORY, DISK = "gpu_memory", "host_memory", "disk"

# ------------------------------------------------------------------------------------------- failures

_GPU_TEXT = ("cuda out of memory", "cuda error: out of memory", "cublas_status_alloc_failed",
             "cudnn_status_alloc_failed", "hip out of memory", "mps backend out of memory", "xpu out of memory")
_HOST_TEXT = ("defaultcpuallocator: can't allocate memory", "defaultcpuallocator: not enough memory",
              "not enough memory", "cannot allocate memory", "killed by signal: killed")
_DISK_TEXT = ("no space left on device", "disk quota exceeded", "pytorchstreamwriter failed writing",
              "file write failed", "unexpected pos ")
_MAX_CHAIN = 16


@dataclass(frozen=True)
class ResourceFailure:
    """What ran out (``kind``: gpu_memory, host_memory or disk) and the message to show the user."""

    kind: str
    message: str


def _chain(exc: BaseException) -> List[BaseException]:
    seen: List[BaseException] = []
    todo = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend([current.__cause__, current.__context__])
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _kind_of(exc: BaseException) -> Optional[str]:
    text = str(exc).lower()
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return GPU_MEMORY
    except ImportError:  # pragma: no cover - the engine always has torch; operators may not
        pass
    if any(marker in text for marker in _GPU_TEXT):
        return GPU_MEMORY
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK
    if any(marker in text for marker in _DISK_TEXT):
        return DISK
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return HOST_MEMORY
    if any(marker in text for marker in _HOST_TEXT):
        return HOST_MEMORY
    return None


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def memory_levers(config: Any = None) -> List[str]:
    """The spec keys that lower training memory, with their current values when ``config`` is given;
    keys already at their memory-saving setting are left out."""
    if config is None:
        return ["lower dataset.train.batch_size", "lower dataset.augmentation.train_crop_size",
                "choose a smaller model.backbone.swin.type (tiny < small < base < large) or "
                "model.backbone.efficientvit.name (b0 < b1 < b2 < l0 < l1 < b3 < l2 < l3)",
                "set model.backbone.swin.use_checkpoint (or efficientvit.use_checkpoint) to true (activation "
                "checkpointing)",
                "set train.precision to bf16 or fp16", "lower model.mask_former.train_num_points"]
    levers = []
    batch = _get(config, "dataset.train.batch_size")
    if batch != 1:
        levers.append(f"lower dataset.train.batch_size (now {batch})")
    crop = _get(config, "dataset.augmentation.train_crop_size")
    levers.append(f"lower dataset.augmentation.train_crop_size (now {crop})")
    family = _get(config, "model.backbone.type") or "swin"
    if family == "efficientvit":
        name = _get(config, "model.backbone.efficientvit.name")
        if name != "b0":
            levers.append(f"choose a smaller model.backbone.efficientvit.name (now {name}; "
                          "b0 < b1 < b2 < l0 < l1 < b3 < l2 < l3)")
    else:
        swin_type = _get(config, "model.backbone.swin.type")
        if swin_type != "tiny":
            levers.append(f"choose a smaller model.backbone.swin.type (now {swin_type}; tiny < small < base < large)")
    if not _get(config, f"model.backbone.{family}.use_checkpoint"):
        levers.append(f"set model.backbone.{family}.use_checkpoint to true (activation checkpointing, about a "
                      "third more compute)")
    precision = _get(config, "train.precision")
    if precision in (None, "fp32"):
        levers.append("set train.precision to bf16 or fp16 (now fp32)")
    points = _get(config, "model.mask_former.train_num_points")
    levers.append(f"lower model.mask_former.train_num_points (now {points})")
    return levers


def _disk_advice(exc: BaseException, config: Any) -> str:
    where = getattr(exc, "filename", None)
    results_dir = _get(config, "results_dir") if config is not None else None
    place = f" (writing {where})" if where else (f" (results in {results_dir})" if results_dir else "")
    return (f"The disk is full{place}: free space there or set results_dir to a larger disk; checkpoints are "
            "written every train.checkpoint_interval units and each is a few hundred MB for Swin-T, and "
            "downloads and extracted datasets are cached under $MASK2FORMER_CACHE (~/.cache/mask2former)")


def classify_resource_error(exc: BaseException, config: Any = None) -> Optional[ResourceFailure]:
    """A :class:`ResourceFailure` when ``exc`` (or an exception it was raised from) is an out-of-memory or
    full-disk error, else None. ``config`` (the job's spec) adds the current values of the keys to change."""
    for item in _chain(exc):
        kind = _kind_of(item)
        if kind is None:
            continue
        detail = _first_line(item)
        if kind == DISK:
            return ResourceFailure(kind=kind, message=f"{_disk_advice(item, config)}. ({detail})")
        levers = memory_levers(config)
        if kind == GPU_MEMORY:
            what = "The GPU ran out of memory"
        else:
            what = "The machine ran out of host memory (RAM)"
            workers = _get(config, "dataset.train.num_workers") if config is not None else None
            levers.append("lower dataset.train.num_workers" + (f" (now {workers}; each loader process holds its "
                                                               "own batches)" if workers is not None else ""))
        return ResourceFailure(kind=kind, message=f"{what} during training: {', '.join(levers[:-1])} or "
                                                  f"{levers[-1]}. ({detail})")
    return None


# ------------------------------------------------------------------------------------ parameter count

_ENCODER_FFN = 1024  # mask2former.model.builder.ENCODER_FFN_DIM
_ENCODER_POINTS = 4  # mask2former.model.builder.ENCODER_NUM_POINTS
_LEVELS = 3


def _swin_parameters(swin: Any) -> int:
    c, p = swin.embed_dim, swin.patch_size
    total = 3 * c * p * p + c + (2 * c if swin.patch_norm else 0)
    if swin.ape:
        total += c * (swin.pretrain_img_size // p) ** 2
    w = swin.window_size
    for s in range(4):
        dim, hidden = c * 2 ** s, int(c * 2 ** s * swin.mlp_ratio)
        block = (4 * dim  # two LayerNorms
                 + 3 * dim * dim + (3 * dim if swin.qkv_bias else 0) + dim * dim + dim  # qkv, proj
                 + (2 * w - 1) ** 2 * swin.num_heads[s]  # relative position bias table
                 + dim * hidden + hidden + hidden * dim + dim)  # MLP
        total += swin.depths[s] * block
        if s < 3:
            total += 2 * 4 * dim + 4 * dim * 2 * dim  # patch merging: LayerNorm(4C), Linear(4C, 2C)
        total += 2 * dim  # output norm of the stage
    return total


#: Parameters of each EfficientViT backbone (mask2former.model.backbone.efficientvit, classification head
#: excluded), and its stage widths res2..res5.
_EFFICIENTVIT_PARAMETERS = {"b0": 682_608, "b1": 4_643_936, "b2": 14_977_008, "b3": 38_997_440,
                            "l0": 27_805_472, "l1": 38_037_280, "l2": 49_090_208, "l3": 193_998_144}
_EFFICIENTVIT_WIDTHS = {"b0": (16, 32, 64, 128), "b1": (32, 64, 128, 256), "b2": (48, 96, 192, 384),
                        "b3": (64, 128, 256, 512), "l0": (64, 128, 256, 512), "l1": (64, 128, 256, 512),
                        "l2": (64, 128, 256, 512), "l3": (128, 256, 512, 1024)}


def _backbone_widths(model_cfg: Any) -> Tuple[int, int, int, int]:
    """Channels of res2..res5."""
    if getattr(model_cfg.backbone, "type", "swin") == "efficientvit":
        return _EFFICIENTVIT_WIDTHS[model_cfg.backbone.efficientvit.name]
    c = model_cfg.backbone.swin.embed_dim
    return (c, 2 * c, 4 * c, 8 * c)


def _pixel_decoder_parameters(model_cfg: Any) -> int:
    widths = _backbone_widths(model_cfg)
    c = widths[0]
    d = model_cfg.sem_seg_head.convs_dim
    heads = model_cfg.mask_former.nheads
    total = sum(widths[s] * d + d + 2 * d for s in (1, 2, 3))  # input projections (conv + GN)
    total += _LEVELS * d  # level embedding
    layer = (d * heads * _LEVELS * _ENCODER_POINTS * 2 + heads * _LEVELS * _ENCODER_POINTS * 2  # offsets
             + d * heads * _LEVELS * _ENCODER_POINTS + heads * _LEVELS * _ENCODER_POINTS  # attention weights
             + 2 * (d * d + d)  # value and output projections
             + 2 * 2 * d  # two LayerNorms
             + d * _ENCODER_FFN + _ENCODER_FFN + _ENCODER_FFN * d + d)  # FFN
    total += model_cfg.sem_seg_head.transformer_enc_layers * layer
    mask_dim = model_cfg.sem_seg_head.mask_dim
    total += d * mask_dim + mask_dim  # mask features
    total += c * d + 2 * d + 9 * d * d + 2 * d  # FPN lateral (no bias) + GN, 3x3 output (no bias) + GN
    return total


def _decoder_parameters(model_cfg: Any) -> int:
    mf = model_cfg.mask_former
    h, q, d = mf.hidden_dim, mf.num_object_queries, model_cfg.sem_seg_head.convs_dim
    total = 2 * q * h + _LEVELS * h
    if d != h:
        total += _LEVELS * (d * h + h)
    attention = 4 * h * h + 4 * h + 2 * h  # in_proj (3h x h + 3h), out_proj, LayerNorm
    layer = 2 * attention + h * mf.dim_feedforward + mf.dim_feedforward + mf.dim_feedforward * h + h + 2 * h
    total += (mf.dec_layers - 1) * layer
    total += 2 * h  # decoder norm
    total += h * (model_cfg.sem_seg_head.num_classes + 1) + model_cfg.sem_seg_head.num_classes + 1
    total += 2 * (h * h + h) + h * model_cfg.sem_seg_head.mask_dim + model_cfg.sem_seg_head.mask_dim  # mask MLP
    return total


def count_parameters(model_cfg: Any) -> int:
    """Parameters of the network ``build_model(model_cfg)`` builds, from the architecture keys alone (no
    model is built). Swin keys left null take their preset's values."""
    from .config.model import resolve_swin

    if getattr(model_cfg.backbone, "type", "swin") == "efficientvit":
        backbone = _EFFICIENTVIT_PARAMETERS[model_cfg.backbone.efficientvit.name]
    else:
        resolve_swin(model_cfg.backbone.swin)
        backbone = _swin_parameters(model_cfg.backbone.swin)
    return backbone + _pixel_decoder_parameters(model_cfg) + _decoder_parameters(model_cfg)


# ------------------------------------------------------------------------------------------- estimate

#: Masks per training image assumed by the loss term (COCO panoptic averages about 11 segments; crowded
#: images have far more). Pass the dataset's own number where it is known.
DEFAULT_MASKS_PER_IMAGE = 20
# Activation coefficients, float32 elements (see the module docstring for the terms and their calibration).
_BACKBONE_TOKEN, _BACKBONE_ATTENTION, _BACKBONE_CHECKPOINTED = 12.78, 4.92, 3.26
_PIXEL_SAMPLING, _PIXEL_FFN, _PIXEL_FPN = 18.76, 1.26, 2.86
_DECODER_MASKS, _DECODER_ATTENTION, _DECODER_QUERIES = 0.63, 0.55, 26.47
_CRITERION_POINTS = 7.49
_HALF_BACKBONE, _HALF_DECODER = 0.80, 1.47
_BACKWARD_TRANSIENT = 0.35
_RUNTIME_BYTES = {"cpu": 134_000_000, "cuda": 1 << 30}
#: EfficientViT: float32 elements per input pixel kept for backward (a_v), and with use_checkpoint (c_v).
_EFFICIENTVIT_ACTIVATIONS = {"b0": (144.3, 11.0), "b1": (351.9, 21.0), "b2": (703.0, 36.0), "b3": (1284.8, 58.5),
                             "l0": (617.8, 38.0), "l1": (701.9, 41.0), "l2": (870.0, 50.0), "l3": (1737.0, 97.0)}
_EFFICIENTVIT_LEVELS = 5  # stem and four stages; checkpointing recomputes about one at a time
_FLOAT = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training process: ``bytes`` = sum of ``breakdown`` (name -> bytes).

    ``levers`` are the spec keys (with their values) that would lower it.
    """

    bytes: int
    breakdown: Dict[str, int]
    levers: Tuple[str, ...] = field(default=())

    def describe(self) -> str:
        parts = sorted(((v, k) for k, v in self.breakdown.items() if v), reverse=True)
        return f"about {_gib(self.bytes)} (" + ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for v, k in parts) + ")"


def _gib(size: float) -> str:
    return f"{size / 2 ** 30:.2f} GiB" if size >= 2 ** 30 / 10 else f"{size / 2 ** 20:.0f} MiB"


def _grid(size: int, stride: int) -> int:
    return math.ceil(size / stride)


def _activation_elements(cfg: Any, *, height: int, width: int, masks_per_image: int) -> Dict[str, float]:
    """Float32 elements kept for backward per image, by component."""
    model = cfg.model
    if getattr(model.backbone, "type", "swin") == "efficientvit":
        tokens = [_grid(height, 4 * 2 ** s) * _grid(width, 4 * 2 ** s) for s in range(4)]
        evit = model.backbone.efficientvit
        full, checkpointed = _EFFICIENTVIT_ACTIVATIONS[evit.name]
        backbone = (checkpointed if evit.use_checkpoint else full) * height * width
    else:
        backbone, tokens = _swin_activation_elements(model.backbone.swin, height=height, width=width)
    head = model.sem_seg_head
    d, enc_tokens = head.convs_dim, tokens[1] + tokens[2] + tokens[3]
    pixel = (_PIXEL_SAMPLING * head.transformer_enc_layers * enc_tokens * d
             + _PIXEL_FFN * head.transformer_enc_layers * enc_tokens * _ENCODER_FFN
             + _PIXEL_FPN * tokens[0] * (d + head.mask_dim))
    mf = model.mask_former
    predictions, queries = mf.dec_layers, mf.num_object_queries
    decoder = (_DECODER_MASKS * predictions * queries * tokens[0]
               + _DECODER_ATTENTION * predictions * queries * (enc_tokens / 3) * mf.nheads
               + _DECODER_QUERIES * predictions * queries * mf.hidden_dim)
    supervised = predictions if mf.deep_supervision else 1
    criterion = _CRITERION_POINTS * supervised * masks_per_image * mf.train_num_points
    if getattr(cfg.train, "precision", "fp32") != "fp32":
        backbone *= _HALF_BACKBONE
        decoder *= _HALF_DECODER
    return {"backbone": backbone, "pixel_decoder": pixel, "transformer_decoder": decoder, "criterion": criterion}


def _swin_activation_elements(swin: Any, *, height: int, width: int) -> Tuple[float, List[int]]:
    """(backbone elements, tokens at strides 4..32) of a Swin backbone."""
    w = swin.window_size
    patch = swin.patch_size
    tokens, padded = [], []
    for s in range(4):
        rows, cols = _grid(height, patch * 2 ** s), _grid(width, patch * 2 ** s)
        tokens.append(rows * cols)
        padded.append(_grid(rows, w) * w * _grid(cols, w) * w)
    widths = [swin.embed_dim * 2 ** s for s in range(4)]
    token_term = sum(swin.depths[s] * tokens[s] * widths[s] for s in range(4))
    attention_term = sum(swin.depths[s] * padded[s] * w * w * swin.num_heads[s] for s in range(4))
    if swin.use_checkpoint:
        return _BACKBONE_CHECKPOINTED * token_term, tokens
    return _BACKBONE_TOKEN * token_term + _BACKBONE_ATTENTION * attention_term, tokens


def _checkpoint_recompute_elements(cfg: Any, *, height: int, width: int) -> float:
    """Activations of the largest Swin block (EfficientViT: about one stage), rebuilt during backward under
    activation checkpointing."""
    if getattr(cfg.model.backbone, "type", "swin") == "efficientvit":
        full, _ = _EFFICIENTVIT_ACTIVATIONS[cfg.model.backbone.efficientvit.name]
        return full * height * width / _EFFICIENTVIT_LEVELS
    swin = cfg.model.backbone.swin
    w, patch = swin.window_size, swin.patch_size
    largest = 0.0
    for s in range(4):
        rows, cols = _grid(height, patch * 2 ** s), _grid(width, patch * 2 ** s)
        padded = _grid(rows, w) * w * _grid(cols, w) * w
        block = _BACKBONE_TOKEN * rows * cols * swin.embed_dim * 2 ** s + \
            _BACKBONE_ATTENTION * padded * w * w * swin.num_heads[s]
        largest = max(largest, block)
    return largest


def estimate_training_memory(cfg: Any, *, device_type: str = "cpu",
                             masks_per_image: int = DEFAULT_MASKS_PER_IMAGE) -> MemoryEstimate:
    """Peak memory of one training process of the spec ``cfg`` (model, dataset, train sections) on a device
    of type ``device_type`` ("cpu" or "cuda"), for batches of ``dataset.train.batch_size`` crops of
    ``dataset.augmentation.train_crop_size`` (padded to ``size_divisibility``). See the module docstring for
    the formula and its measured error."""
    if device_type not in _RUNTIME_BYTES:
        raise ValueError(f"device_type must be one of {sorted(_RUNTIME_BYTES)}, got {device_type!r}")
    if masks_per_image < 1:
        raise ValueError(f"masks_per_image must be >= 1, got {masks_per_image}")
    params = count_parameters(cfg.model)
    augmentation = cfg.dataset.augmentation
    divisor = max(1, int(getattr(augmentation, "size_divisibility", 1) or 1))
    height, width = (_grid(int(side), divisor) * divisor for side in augmentation.train_crop_size)
    batch = int(cfg.dataset.train.batch_size)
    per_image = _activation_elements(cfg, height=height, width=width, masks_per_image=masks_per_image)
    breakdown = {
        "parameters": params * _FLOAT,
        "gradients": params * _FLOAT,
        "optimizer_state": 2 * params * _FLOAT,
        "half_precision_weights": 2 * params if cfg.train.precision != "fp32" else 0,
    }
    activations = 0
    for name, elements in per_image.items():
        breakdown[f"activations_{name}"] = int(round(elements * batch * _FLOAT))
        activations += breakdown[f"activations_{name}"]
    transient = _BACKWARD_TRANSIENT * activations
    family = getattr(cfg.model.backbone, "type", "swin")
    if getattr(cfg.model.backbone, family).use_checkpoint:
        transient += _checkpoint_recompute_elements(cfg, height=height, width=width) * batch * _FLOAT
    breakdown["backward_transient"] = int(round(transient))
    breakdown["runtime"] = _RUNTIME_BYTES[device_type]
    return MemoryEstimate(bytes=sum(breakdown.values()), breakdown=breakdown, levers=tuple(memory_levers(cfg)))


# ---------------------------------------------------------------------------------------------- fitting

#: Share of the free memory an estimate may take before :func:`check_fits` warns (the estimate's error).
FIT_MARGIN = 0.9


def available_memory(device: Union[str, Any]) -> Tuple[int, str]:
    """(free bytes, description) of a device: ``torch.cuda.mem_get_info`` on a CUDA device, the host's
    available memory (psutil) otherwise."""
    name = str(device)
    if name.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(name))
        return int(free), f"{_gib(free)} free of {_gib(total)} on {name}"
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.available), f"{_gib(memory.available)} available of {_gib(memory.total)} host memory"


def check_fits(estimate: MemoryEstimate, device: Union[str, Any], *, processes: int = 1,
               available: Optional[int] = None) -> Optional[str]:
    """A warning (str) when ``processes`` training processes of ``estimate`` will probably not fit the
    device's free memory, else None. ``available`` overrides the measured free bytes (tests, planning)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if available is None:
        free, where = available_memory(device)
    else:
        free, where = int(available), f"{_gib(available)} free on {device}"
    need = estimate.bytes * processes
    if need <= FIT_MARGIN * free:
        return None
    who = f"{processes} training processes need" if processes > 1 else "Training needs"
    levers: Sequence[str] = estimate.levers or memory_levers(None)
    return (f"{who} an estimated {_gib(need)} on {device} ({estimate.describe()}) but only {where}: it will "
            f"probably run out of memory; to need less, {', '.join(levers[:-1])} or {levers[-1]}.")
