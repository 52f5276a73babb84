"""Rules that tie several keys together; each broken rule is one SpecError sentence."""

from __future__ import annotations

import re
from typing import List, Optional

from .errors import SpecError
from .experiment import ExperimentConfig


def _one_of(section: str, cfg: object, names: List[str], required: bool) -> None:
    given = [n for n in names if getattr(cfg, n) not in (None, "")]
    if len(given) > 1:
        raise SpecError(f"{section}: set only one of {', '.join(section + '.' + n for n in names)}; got "
                        f"{', '.join(section + '.' + n for n in given)}.")
    if required and not given:
        raise SpecError(f"{section}: one of {', '.join(section + '.' + n for n in names)} is needed (the model to "
                        f"run); none is set.")


def _check_model(config: ExperimentConfig) -> None:
    model = config.model
    swin = model.backbone.swin
    if sorted(swin.out_indices) != [0, 1, 2, 3]:
        raise SpecError(f"model.backbone.swin.out_indices {swin.out_indices} is refused: the pixel decoder needs "
                        "all four stages, [0, 1, 2, 3] (TAO's default).")
    for stage, heads in enumerate(swin.num_heads):
        dim = swin.embed_dim * 2 ** stage
        if dim % heads:
            raise SpecError(f"model.backbone.swin.num_heads[{stage}] = {heads} does not divide the stage width "
                            f"{dim} (embed_dim {swin.embed_dim} x 2^{stage}).")
    _check_digest("model.backbone.pretrained_weights_sha256", model.backbone.pretrained_weights_sha256,
                  "model.backbone.pretrained_weights", model.backbone.pretrained_weights)
    mf = model.mask_former
    if mf.hidden_dim % mf.nheads:
        raise SpecError(f"model.mask_former.hidden_dim = {mf.hidden_dim} must be a multiple of "
                        f"model.mask_former.nheads = {mf.nheads}.")
    if model.sem_seg_head.convs_dim % mf.nheads:
        raise SpecError(f"model.sem_seg_head.convs_dim = {model.sem_seg_head.convs_dim} must be a multiple of "
                        f"model.mask_former.nheads = {mf.nheads} (the deformable encoder's attention heads).")


def _check_target_size(config: ExperimentConfig) -> None:
    """[width, height] or [] (off), as TAO; the test split also takes one value for a square, as TAO does."""
    for split in ("train", "val", "test"):
        size = list(getattr(config.dataset, split).target_size)
        lengths = (0, 1, 2) if split == "test" else (0, 2)
        if len(size) not in lengths:
            square = ", or [size] for a square" if split == "test" else ""
            raise SpecError(f"dataset.{split}.target_size {size} is not a size: expected [width, height] "
                            f"(two positive integers; every image is stretched to that size{square}) or [] (off, "
                            "TAO's default).")


def _check_pixel_scale(config: ExperimentConfig) -> None:
    """pixel_mean/pixel_std are on TAO's 0..1 scale; values on the 0..255 scale would normalise wrongly."""
    ds = config.dataset
    for key, values, imagenet in (("pixel_mean", ds.pixel_mean, "[0.485, 0.456, 0.406]"),
                                  ("pixel_std", ds.pixel_std, "[0.229, 0.224, 0.225]")):
        if max(values) > 1:
            raise SpecError(f"dataset.{key} {list(values)} is above 1: it is on TAO's 0..1 scale (the image is divided "
                            f"by 255, then normalised; ImageNet's is {imagenet}). Divide 0..255 values by 255.")


def _split_needs(mode: str, split_name: str, split: object, *, training: bool) -> Optional[str]:
    """Why a split cannot feed the given mode, or None. An ade split holds semantic labels only: a model of
    another mode can be scored on it (mIoU of its semantic output, as TAO's deploy scores ADE) but not trained."""
    if split.type == "ade":
        if not split.annot_file:
            return f"dataset.{split_name}.type ade needs dataset.{split_name}.annot_file (JSONL of img/segm pairs)"
        if training and mode != "semantic":
            return (f"dataset.{split_name}.type ade holds semantic labels only, so training on it needs model.mode "
                    f"semantic (it is {mode})")
        return None
    has_panoptic = bool(split.panoptic_json and split.panoptic_dir)
    has_instance = bool(split.instance_json)
    if not split.img_dir:
        return f"dataset.{split_name}.img_dir is not set"
    if mode == "panoptic" and not has_panoptic:
        return (f"model.mode panoptic needs dataset.{split_name}.panoptic_json and dataset.{split_name}.panoptic_dir "
                f"(type coco_panoptic)")
    if mode in ("instance", "semantic") and not (has_panoptic or has_instance):
        return (f"model.mode {mode} needs dataset.{split_name}.instance_json, or dataset.{split_name}.panoptic_json "
                f"with dataset.{split_name}.panoptic_dir")
    return None


def _split_is_set(split: object) -> bool:
    return any(getattr(split, k) for k in ("img_dir", "instance_json", "panoptic_json", "panoptic_dir", "annot_file"))


def _check_data(action: str, config: ExperimentConfig) -> None:
    ds, mode = config.dataset, config.model.mode
    needed = []
    if action == "train":
        needed.append("train")
        if _split_is_set(ds.val):
            needed.append("val")
    elif action == "evaluate" and not config.evaluate.predictions:
        needed.append("val")
    elif action == "evaluate":
        if not (ds.val.instance_json or ds.val.panoptic_json or ds.val.annot_file):
            raise SpecError("evaluate.predictions needs ground truth: dataset.val.panoptic_json (with panoptic_dir), "
                            "dataset.val.instance_json or dataset.val.annot_file (type ade).")
    elif action == "quantize" and _split_is_set(ds.val):
        needed.append("val")
    for split_name in needed:
        problem = _split_needs(mode, split_name, getattr(ds, split_name), training=action == "train")
        if problem:
            raise SpecError(f"{action}: {problem}.")
    if action in ("train", "evaluate", "quantize") and needed and not ds.label_map:
        raise SpecError(f"{action}: dataset.label_map is not set (label_map.json or label_map_panoptic.json: a "
                        "list of {id, name, color, isthing}).")
    if action == "inference" and not ds.test.img_dir:
        raise SpecError("inference: dataset.test.img_dir is not set (a folder or images.tar.gz of the images to "
                        "segment).")


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _check_digest(digest_key: str, digest: Optional[str], file_key: str, file_value: Optional[str]) -> None:
    """An expected SHA-256 must be 64 hex digits and goes with the file it checks."""
    if digest is None:
        return
    if not _SHA256.fullmatch(digest):
        raise SpecError(f"{digest_key} {digest!r} is not a SHA-256 digest: expected 64 hexadecimal digits (as "
                        "printed by `sha256sum FILE`).")
    if not file_value:
        raise SpecError(f"{digest_key} is set but {file_key} is not: the digest checks that file, so set both or "
                        "neither.")


def _check_train(config: ExperimentConfig) -> None:
    train = config.train
    _check_digest("train.pretrained_model_sha256", train.pretrained_model_sha256, "train.pretrained_model_path",
                  train.pretrained_model_path)
    if train.distributed_strategy == "fsdp" and train.clip_grad_type != "full":
        raise SpecError("train.clip_grad_type norm clips each parameter's gradient, which FSDP shards across "
                        "devices: use clip_grad_type full with distributed_strategy fsdp.")
    if train.distributed_strategy == "fsdp" and train.precision == "fp32":
        raise SpecError("train.distributed_strategy fsdp needs train.precision fp16 or bf16 (got fp32).")
    if len(train.gpu_ids) < train.num_gpus:
        raise SpecError(f"train.gpu_ids {train.gpu_ids} lists fewer GPUs than train.num_gpus = {train.num_gpus}.")
    if sorted(train.optim.milestones) != list(train.optim.milestones):
        raise SpecError(f"train.optim.milestones {train.optim.milestones} must be increasing.")


def _check_trt(config: ExperimentConfig) -> None:
    trt = config.gen_trt_engine.tensorrt
    if trt.data_type == "INT8":
        raise SpecError("gen_trt_engine.tensorrt.data_type INT8 is refused: Mask2Former engines support FP32 and "
                        "FP16 only (use quantize for int8).")
    if not trt.min_batch_size <= trt.opt_batch_size <= trt.max_batch_size:
        raise SpecError("gen_trt_engine.tensorrt batch sizes must satisfy min_batch_size <= opt_batch_size <= "
                        f"max_batch_size; got {trt.min_batch_size}, {trt.opt_batch_size}, {trt.max_batch_size}.")
    for entry in trt.layers_precision:
        name, sep, precision = entry.rpartition(":")
        if not sep or not name or precision.lower() not in ("fp32", "fp16"):
            raise SpecError(f"gen_trt_engine.tensorrt.layers_precision entry {entry!r} must read "
                            "'layer_name_pattern:fp32' or 'layer_name_pattern:fp16'.")
    if not config.gen_trt_engine.onnx_file:
        raise SpecError("gen_trt_engine.onnx_file is not set (the ONNX model to build the engine from).")


_QUANTIZE_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _check_quantize(config: ExperimentConfig) -> None:
    q = config.quantize
    if q.device == "trt":
        raise SpecError("quantize.device trt is a TAO value that is not implemented here: calibration runs on cpu "
                        "or cuda (gen_trt_engine builds TensorRT engines).")
    if not _QUANTIZE_DEVICE.fullmatch(q.device):
        raise SpecError(f"quantize.device {q.device!r} must read cpu, cuda or cuda:N (a GPU index).")
    if q.backend_kwargs and q.backend != "modelopt.onnx":
        raise SpecError(f"quantize.backend_kwargs {sorted(q.backend_kwargs)} is passed to ModelOpt's ONNX quantize "
                        f"call (backend modelopt.onnx); backend {q.backend} takes its settings from quantize.mode, "
                        "quantize.algorithm and quantize.layers only. Leave it {} (TAO's default).")
    if not q.model_path:
        raise SpecError("quantize.model_path is not set (the checkpoint to quantize).")
    if q.backend == "torchao" and q.mode != "weight_only_ptq":
        raise SpecError(f"quantize.backend torchao supports quantize.mode weight_only_ptq only (got {q.mode}); "
                        "use modelopt.pytorch or modelopt.onnx for static_ptq.")
    if q.backend == "modelopt.onnx" and q.mode != "static_ptq":
        raise SpecError("quantize.backend modelopt.onnx supports quantize.mode static_ptq only (it writes a Q/DQ "
                        f"ONNX model from calibration data); got {q.mode}.")
    if q.mode == "static_ptq" and not config.dataset.quant_calibration_dataset.images_dir:
        raise SpecError("quantize.mode static_ptq needs calibration images: "
                        "dataset.quant_calibration_dataset.images_dir is not set.")
    for i, layer in enumerate(q.layers):
        if q.backend == "torchao" and layer.weights.dtype not in ("int8", "native"):
            raise SpecError(f"quantize.layers[{i}].weights.dtype {layer.weights.dtype} is not available with "
                            "backend torchao (int8 or native).")


def check_rules(action: str, config: ExperimentConfig) -> None:
    """Raise SpecError for the first cross-key rule the resolved config breaks.

    The action's own section is checked before the data, so the first message is about what the user
    asked for rather than a consequence of it.
    """
    if "model" in _sections(action):
        _check_model(config)
    if "dataset" in _sections(action):
        _check_pixel_scale(config)
        _check_target_size(config)
    if action == "train":
        _check_train(config)
    elif action == "evaluate":
        _one_of("evaluate", config.evaluate, ["checkpoint", "onnx_file", "trt_engine", "predictions"], True)
    elif action == "inference":
        _one_of("inference", config.inference, ["checkpoint", "onnx_file", "trt_engine"], True)
    elif action == "export" and not config.export.checkpoint:
        raise SpecError("export.checkpoint is not set (the checkpoint to export).")
    elif action == "gen_trt_engine":
        _check_trt(config)
    elif action == "quantize":
        _check_quantize(config)
    _check_data(action, config)


def _sections(action: str):
    from .experiment import ACTION_SECTIONS

    return ACTION_SECTIONS[action]
