"""The checkpoint file every action reads and writes.

A checkpoint is a ``torch.save``'d dict::

    {"format": "mask2former-airflow/1",
     "state_dict": {...},            # model weights, no "model." prefix
     "model_config": {...},          # dataclasses.asdict(config.model) of the run that wrote it
     "label_map": [...] | None,      # list of {id, name, color, isthing}
     "contiguous_id": bool,
     "epoch": int, "global_step": int,
     ...}                            # train adds its resume state (optimizer_states, lr_schedulers, loops)

A checkpoint of NVIDIA TAO's trainer (Lightning ``.pth``, TAO's parameter names) is recognised and read as one
of these (:mod:`mask2former.model.tao_weights`: weights renamed, class head re-laid out for the reading action's
``dataset.contiguous_id``; export, which has no dataset section, takes TAO's default false).

The architecture of a saved model comes from its checkpoint, so evaluate, export and quantize rebuild
exactly what was trained; their spec's post-processing keys (mode, thresholds, top-k) still apply.

Encryption (:mod:`mask2former.crypto`): with ``encryption_key`` the file is written encrypted; readers detect
an encrypted file by its header and need the key, else they refuse with one sentence naming the file before
anything else is done. :func:`read_model_bytes`, :func:`write_model_bytes` and :func:`publish_model_file` do
the same for ONNX and other model files (``onnxruntime.InferenceSession(bytes)`` loads from memory).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import crypto
from .config.loader import dataclass_from_dict
from .config.model import ModelConfig, resolve_swin
from .model.tao_weights import convert_tao_payload, is_tao_payload

FORMAT = "mask2former-airflow/1"
POSTPROCESS_KEYS = ("mode", "object_mask_threshold", "overlap_threshold", "test_topk_per_image")

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file."""


def save_checkpoint(path: PathLike, payload: Dict[str, Any], encryption_key: Optional[str] = None) -> None:
    """Write atomically: a reader sees the previous file or the complete new one. Encrypted (streamed, no
    plaintext on disk) when ``encryption_key`` is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("format", FORMAT)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if encryption_key:
            with open(tmp, "wb") as raw, crypto.encrypting_stream(raw, encryption_key) as stream:
                torch.save(payload, stream)
        else:
            torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_checkpoint_key(path: PathLike, encryption_key: Optional[str] = None) -> None:
    """Refuse early (CheckpointError, one sentence) when ``path`` is encrypted and the key is missing or wrong;
    reads only the header. Plain files and missing files pass (their readers say what is wrong)."""
    if not Path(path).is_file():
        return
    try:
        crypto.check_key(path, encryption_key)
    except crypto.EncryptionError as exc:
        raise CheckpointError(str(exc)) from None


def checkpoint_source(path: PathLike, encryption_key: Optional[str] = None) -> Union[Path, io.BytesIO]:
    """What ``torch.load`` should read: ``path`` itself, or its plaintext in memory when it is encrypted.

    A missing or wrong key is a CheckpointError (one sentence naming the file).
    """
    path = Path(path)
    if not crypto.is_encrypted(path):
        verify_checksums(path)
        return path
    try:
        return io.BytesIO(crypto.decrypt_to_bytes(path, encryption_key))
    except crypto.EncryptionError as exc:
        raise CheckpointError(str(exc)) from None


def verify_checksums(path: PathLike) -> None:
    """Refuse (CheckpointError naming the file) a plain checkpoint whose bytes changed after it was written.

    ``torch.save`` writes a zip archive whose members carry CRC-32s, which ``torch.load`` never checks: a file
    damaged inside a tensor would load with wrong weights. Every member is read once and compared. Encrypted
    files need no such check (their segments are authenticated); a file that is no zip at all (the legacy
    format, a truncated file) is left to ``torch.load``, which says what is wrong.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint '{path}' is damaged or truncated: {exc}") from None
    if damaged is not None:
        part = damaged.split("/", 1)[-1]  # without the archive's top folder
        raise CheckpointError(f"Checkpoint '{path}' is damaged: its part '{part}' fails its CRC-32 check (the file "
                              "changed after it was written, or was copied incompletely).")


def read_checkpoint(path: PathLike, encryption_key: Optional[str] = None, *,
                    tao_contiguous_id: bool = False) -> Dict[str, Any]:
    """The checkpoint payload; an encrypted file is decrypted in memory with ``encryption_key``. A TAO checkpoint
    comes back converted, its class head laid out for ``tao_contiguous_id`` (the spec's dataset.contiguous_id)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    source = checkpoint_source(path, encryption_key)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise CheckpointError(f"Checkpoint '{path}' cannot be read as a model checkpoint: {exc}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"Checkpoint '{path}' holds no 'state_dict'; expected a checkpoint written by this "
                              "tool, by `python -m mask2former import-weights` or by NVIDIA TAO's trainer.")
    if is_tao_payload(payload):
        try:
            payload = convert_tao_payload(payload, contiguous_id=tao_contiguous_id, source=str(path))
        except ValueError as exc:
            raise CheckpointError(f"Checkpoint '{path}' looks like NVIDIA TAO's but cannot be mapped: {exc}") from None
        payload["format"] = FORMAT
    return payload


def model_config_from(payload: Dict[str, Any], spec_model: Optional[ModelConfig] = None) -> ModelConfig:
    """The checkpoint's architecture with the spec's post-processing keys applied on top."""
    saved = payload.get("model_config")
    if saved is None:
        if spec_model is None:
            raise CheckpointError("The checkpoint records no model_config and no spec model section was given.")
        return spec_model
    config = dataclass_from_dict(ModelConfig, saved)
    if spec_model is not None:
        for key in POSTPROCESS_KEYS:
            setattr(config, key, getattr(spec_model, key))
        _log_architecture_differences(config, spec_model)
    resolve_swin(config.backbone.swin)
    return config


def _log_architecture_differences(saved: ModelConfig, spec: ModelConfig) -> None:
    a, b = dataclasses.asdict(saved), dataclasses.asdict(spec)
    for section in ("backbone", "sem_seg_head", "mask_former"):
        for key, value in _flatten(a[section]).items():
            spec_value = _flatten(b[section]).get(key)
            if spec_value is not None and spec_value != value and key != "pretrained_weights":
                log.info("model.%s.%s: using the checkpoint's %r (the spec says %r)", section, key, value, spec_value)


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def build_model_from_checkpoint(source: Union[PathLike, Dict[str, Any]],
                                model_cfg: Optional[ModelConfig] = None,
                                encryption_key: Optional[str] = None,
                                tao_contiguous_id: bool = False) -> Tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the saved model in eval mode, weights loaded strictly (``tao_contiguous_id``: see read_checkpoint)."""
    from .model import build_model

    payload = source if isinstance(source, dict) else read_checkpoint(source, encryption_key=encryption_key,
                                                                      tao_contiguous_id=tao_contiguous_id)
    config = model_config_from(payload, model_cfg)
    config.backbone.pretrained_weights = None
    model = build_model(config)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        name = source if not isinstance(source, dict) else "checkpoint"
        raise CheckpointError(f"Checkpoint '{name}' does not match its recorded architecture: missing keys "
                              f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}.")
    model.eval()
    return model, config


def read_model_bytes(path: PathLike, encryption_key: Optional[str] = None) -> bytes:
    """The bytes of a model file (ONNX, TensorRT engine, ...), decrypted when it is encrypted.

    A missing or wrong key is a CheckpointError with one sentence naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Model file '{path}' does not exist.")
    try:
        return crypto.open_model_bytes(path, encryption_key)
    except crypto.EncryptionError as exc:
        raise CheckpointError(str(exc)) from None


def write_model_bytes(path: PathLike, data: bytes, encryption_key: Optional[str] = None) -> None:
    """Write a model file atomically, encrypted when ``encryption_key`` is given."""
    crypto.write_model_bytes(path, data, encryption_key)


def publish_model_file(src: PathLike, dst: PathLike, encryption_key: Optional[str] = None) -> None:
    """Move a finished model file (e.g. a checked ONNX file in a work folder) to ``dst`` atomically, encrypting
    it on the way when ``encryption_key`` is given; ``src`` is removed."""
    if encryption_key:
        crypto.encrypt_file(src, dst, encryption_key)
        Path(src).unlink()
    else:
        os.replace(src, dst)
