"""Encrypted model artifacts: round trips, refusals in one sentence, tamper and truncation detection, and the
key never reaching experiment.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from mask2former import cli, crypto
from mask2former.checkpoint import (CheckpointError, check_checkpoint_key, publish_model_file, read_checkpoint,
                                    read_model_bytes, save_checkpoint, write_model_bytes)
from mask2former.config import SpecError, load_spec, spec_to_dict

KEY = "correct horse battery staple"
LABEL = "label-name-that-must-not-show"


def _payload() -> dict:
    torch.manual_seed(0)
    return {"state_dict": {"w": torch.randn(300, 300), "b": torch.arange(7)},
            "model_config": {"mode": "semantic"}, "label_map": [{"id": 1, "name": LABEL, "color": [1, 2, 3],
                                                                  "isthing": 0}],
            "contiguous_id": False, "epoch": 3, "global_step": 42}


@pytest.fixture
def encrypted_checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.pth"
    save_checkpoint(path, _payload(), encryption_key=KEY)
    return path


def _small_chunks(tmp_path: Path, data: bytes, chunk_size: int = 1000) -> Path:
    path = tmp_path / "small-chunks.bin"
    with open(path, "wb") as raw, crypto.EncryptingWriter(raw, KEY, chunk_size=chunk_size) as writer:
        writer.write(data)
    return path


def test_checkpoint_round_trip(encrypted_checkpoint):
    raw = encrypted_checkpoint.read_bytes()
    assert crypto.is_encrypted(encrypted_checkpoint)
    assert LABEL.encode() not in raw and b"state_dict" not in raw, "nothing of the payload is readable"
    payload = read_checkpoint(encrypted_checkpoint, encryption_key=KEY)
    expected = _payload()
    assert torch.equal(payload["state_dict"]["w"], expected["state_dict"]["w"])
    assert payload["label_map"][0]["name"] == LABEL and payload["global_step"] == 42


def test_plain_checkpoints_still_read_with_or_without_a_key(tmp_path):
    path = tmp_path / "plain.pth"
    save_checkpoint(path, _payload())
    assert not crypto.is_encrypted(path)
    assert read_checkpoint(path)["epoch"] == 3 and read_checkpoint(path, encryption_key=KEY)["epoch"] == 3


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3000, 5321])
def test_chunked_stream_round_trip_at_every_boundary(tmp_path, size):
    data = os.urandom(size)
    path = _small_chunks(tmp_path, data)
    assert crypto.decrypt_to_bytes(path, KEY) == data
    chunks = max(1, -(-size // 1000))
    assert path.stat().st_size == crypto.HEADER_BYTES + size + chunks * crypto.TAG_BYTES


def test_wrong_key_is_refused_in_one_sentence(encrypted_checkpoint):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(encrypted_checkpoint, encryption_key="not the key")
    assert str(info.value) == (f"The encryption key is wrong for '{encrypted_checkpoint}': it does not open this "
                               "file (give the key it was encrypted with).")


def test_missing_key_is_refused_in_one_sentence(encrypted_checkpoint, monkeypatch):
    monkeypatch.setenv(crypto.KEY_ENV, KEY)  # readers take the key they are given, never the environment
    for key in (None, ""):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(encrypted_checkpoint, encryption_key=key)
        assert str(info.value) == (f"'{encrypted_checkpoint}' is encrypted and no encryption key was given: set "
                                   f"encryption_key in the spec or the environment variable {crypto.KEY_ENV}.")


def test_the_key_is_checked_from_the_header_before_anything_else(encrypted_checkpoint):
    # cut the body away: a wrong key is still reported as a wrong key, so the check needs only the header
    encrypted_checkpoint.write_bytes(encrypted_checkpoint.read_bytes()[:crypto.HEADER_BYTES])
    with pytest.raises(CheckpointError, match="encryption key is wrong"):
        check_checkpoint_key(encrypted_checkpoint, "not the key")
    check_checkpoint_key(encrypted_checkpoint, KEY)  # right key: the header passes, the body is not read


def test_wrong_key_leaves_the_target_untouched(encrypted_checkpoint, tmp_path):
    target = tmp_path / "deployed.pth"
    target.write_bytes(b"the model in service")
    before = target.stat().st_mtime_ns
    with pytest.raises(crypto.EncryptionKeyError):
        crypto.decrypt_file(encrypted_checkpoint, target, "not the key")
    assert target.read_bytes() == b"the model in service" and target.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.pth", "model.pth"], "no temporary file left"


def test_tampered_ciphertext_is_refused(encrypted_checkpoint, tmp_path):
    data = bytearray(encrypted_checkpoint.read_bytes())
    data[crypto.HEADER_BYTES + 5000] ^= 0x01
    encrypted_checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged, truncated or was tampered with: encrypted chunk 0 fails"):
        read_checkpoint(encrypted_checkpoint, encryption_key=KEY)
    target = tmp_path / "out.pth"
    with pytest.raises(crypto.DamagedFileError):
        crypto.decrypt_file(encrypted_checkpoint, target, KEY)
    assert not target.exists(), "a file that fails authentication is never written out"


@pytest.mark.parametrize("cut", ["chunk_boundary", "mid_chunk", "header_only"])
def test_truncated_file_is_refused(tmp_path, cut):
    path = _small_chunks(tmp_path, os.urandom(3500))
    data = path.read_bytes()
    block = 1000 + crypto.TAG_BYTES
    keep = {"chunk_boundary": crypto.HEADER_BYTES + 2 * block, "mid_chunk": crypto.HEADER_BYTES + 2 * block + 300,
            "header_only": crypto.HEADER_BYTES}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(crypto.DamagedFileError, match="truncated"):
        crypto.decrypt_to_bytes(path, KEY)


def test_reordered_or_extended_streams_are_refused(tmp_path):
    path = _small_chunks(tmp_path, os.urandom(3500))
    data = path.read_bytes()
    head, body = data[:crypto.HEADER_BYTES], data[crypto.HEADER_BYTES:]
    block = 1000 + crypto.TAG_BYTES
    chunks = [body[i:i + block] for i in range(0, len(body), block)]
    path.write_bytes(head + chunks[1] + chunks[0] + b"".join(chunks[2:]))
    with pytest.raises(crypto.DamagedFileError, match="chunk 0 fails authentication"):
        crypto.decrypt_to_bytes(path, KEY)
    path.write_bytes(data + chunks[0])
    with pytest.raises(crypto.DamagedFileError):
        crypto.decrypt_to_bytes(path, KEY)


def test_a_file_is_not_encrypted_twice_and_empty_keys_do_not_encrypt(encrypted_checkpoint, tmp_path):
    with pytest.raises(crypto.EncryptionError, match="already encrypted"):
        crypto.encrypt_file(encrypted_checkpoint, tmp_path / "twice.pth", KEY)
    with pytest.raises(crypto.EncryptionKeyError, match="No encryption key"):
        crypto.encrypt_file(encrypted_checkpoint, tmp_path / "x.pth", "")


def _tiny_onnx() -> bytes:
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_encrypted_onnx_model_runs_in_onnxruntime_from_memory(tmp_path):
    path = tmp_path / "model.onnx"
    write_model_bytes(path, _tiny_onnx(), encryption_key=KEY)
    assert crypto.is_encrypted(path)
    with pytest.raises(Exception):
        onnx.load(str(path))  # unreadable without the key
    session = ort.InferenceSession(read_model_bytes(path, encryption_key=KEY), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.array([1.5, 2.0], dtype=np.float32)})
    assert out.tolist() == [3.0, 4.0]
    with pytest.raises(CheckpointError, match="no encryption key was given"):
        read_model_bytes(path)


def test_publish_model_file_encrypts_on_the_way(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes(_tiny_onnx())
    publish_model_file(work / "model.onnx", tmp_path / "model.onnx", encryption_key=KEY)
    assert not (work / "model.onnx").exists()
    assert read_model_bytes(tmp_path / "model.onnx", encryption_key=KEY) == _tiny_onnx()
    (work / "plain.onnx").write_bytes(b"plain")
    publish_model_file(work / "plain.onnx", tmp_path / "plain.onnx")
    assert read_model_bytes(tmp_path / "plain.onnx") == b"plain"


def test_shell_command_encrypts_checks_and_decrypts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(crypto.KEY_ENV, KEY)
    src = tmp_path / "model.onnx"
    src.write_bytes(_tiny_onnx())
    assert crypto.main(["encrypt", str(src), str(tmp_path / "enc.onnx")]) == 0
    assert crypto.main(["check", str(tmp_path / "enc.onnx")]) == 0
    assert "the key opens it" in capsys.readouterr().out
    assert crypto.main(["decrypt", str(tmp_path / "enc.onnx"), str(tmp_path / "dec.onnx")]) == 0
    assert (tmp_path / "dec.onnx").read_bytes() == _tiny_onnx()
    monkeypatch.setenv(crypto.KEY_ENV, "wrong")
    assert crypto.main(["decrypt", str(tmp_path / "enc.onnx")]) == 1
    assert "encryption key is wrong" in capsys.readouterr().err
    assert crypto.is_encrypted(tmp_path / "enc.onnx"), "a refused in-place decryption leaves the file as it was"


# ------------------------------------------------------------------------------- the key in the spec

EXPORT = {"export.checkpoint": "m.pth"}


def test_spec_to_dict_never_carries_the_key_unless_asked():
    config = load_spec("export", overrides={**EXPORT, "encryption_key": KEY})
    assert config.encryption_key == KEY
    assert "encryption_key" not in spec_to_dict("export", config)
    assert KEY not in yaml.safe_dump(spec_to_dict("export", config))
    assert spec_to_dict("export", config, include_secrets=True)["encryption_key"] == KEY


def test_a_wrongly_typed_key_is_refused_without_echoing_it():
    with pytest.raises(SpecError) as info:
        load_spec("export", overrides={**EXPORT, "encryption_key": 987654321})
    assert "encryption_key" in str(info.value) and "987654321" not in str(info.value)


@pytest.mark.parametrize("source", ["override", "environment"])
def test_cli_never_writes_the_key_to_the_results_folder(tmp_path, monkeypatch, source, capsys):
    secret = "s3cr3t-passphrase-" + source
    words = ["export", "--results-dir", str(tmp_path / "job"), "export.checkpoint=" + str(tmp_path / "missing.pth")]
    if source == "override":
        words.append(f"encryption_key={secret}")
    else:
        monkeypatch.setenv(crypto.KEY_ENV, secret)
    captured = {}
    real_load = cli.load_spec

    def spying_load_spec(*args, **kwargs):
        captured["config"] = real_load(*args, **kwargs)
        return captured["config"]

    monkeypatch.setattr(cli, "load_spec", spying_load_spec)
    assert cli.main(words) == 1  # the checkpoint does not exist: FAILURE, after experiment.yaml was written
    assert captured["config"].encryption_key == secret, "the action receives the key"
    experiment = yaml.safe_load((tmp_path / "job" / "experiment.yaml").read_text())
    assert "encryption_key" not in experiment and experiment["export"]["checkpoint"].endswith("missing.pth")
    for path in (tmp_path / "job").rglob("*"):
        assert secret not in path.read_text(), path
    status = [json.loads(line) for line in (tmp_path / "job" / "status.json").read_text().splitlines()]
    assert status[-1]["status"] == "FAILURE"
    output = capsys.readouterr()
    assert secret not in output.out + output.err
