"""Encrypted model artifacts (Tink streaming AEAD, format 2): round trips, refusals in one sentence, tamper and
truncation detection, and the key never reaching experiment.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def _encrypted(tmp_path: Path, data: bytes, name: str = "data.bin") -> Path:
    path = tmp_path / name
    crypto.write_model_bytes(path, data, KEY)
    return path


SEGMENT = crypto.SEGMENT_BYTES
TINK_HEADER = 40  # Tink's own header of an AES256_GCM_HKDF stream: length byte, 32-byte salt, 7-byte nonce prefix


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


@pytest.mark.parametrize("size", [0, 1, SEGMENT - TINK_HEADER - 17, SEGMENT - TINK_HEADER - 16,
                                  SEGMENT - TINK_HEADER - 15, 2 * SEGMENT + 3])
def test_stream_round_trip_at_every_segment_boundary(tmp_path, size):
    data = os.urandom(size)
    path = _encrypted(tmp_path, data)
    assert crypto.decrypt_to_bytes(path, KEY) == data
    first = SEGMENT - TINK_HEADER - 16  # plaintext bytes of the first segment; later ones hold SEGMENT - 16
    segments = 1 + max(0, -(-(size - first) // (SEGMENT - 16)))
    overhead = path.stat().st_size - size  # a stream that fills its last segment exactly may end with an empty one
    assert overhead in (crypto.HEADER_BYTES + TINK_HEADER + 16 * segments,
                        crypto.HEADER_BYTES + TINK_HEADER + 16 * (segments + 1))


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
    with pytest.raises(CheckpointError, match="is damaged, truncated or was tampered with: its encrypted data fails "
                                              "authentication after 0 plaintext bytes"):
        read_checkpoint(encrypted_checkpoint, encryption_key=KEY)
    target = tmp_path / "out.pth"
    with pytest.raises(crypto.DamagedFileError):
        crypto.decrypt_file(encrypted_checkpoint, target, KEY)
    assert not target.exists(), "a file that fails authentication is never written out"


def test_a_tampered_header_is_refused_before_any_segment(encrypted_checkpoint):
    data = bytearray(encrypted_checkpoint.read_bytes())
    data[20] ^= 0x01  # a salt byte: the key check no longer matches
    encrypted_checkpoint.write_bytes(bytes(data))
    with pytest.raises(crypto.EncryptionKeyError, match="encryption key is wrong"):
        crypto.check_key(encrypted_checkpoint, KEY)


@pytest.mark.parametrize("keep", ["segment_boundary", "mid_segment", "header_only", "tink_header_only"])
def test_truncated_file_is_refused(tmp_path, keep):
    path = _encrypted(tmp_path, os.urandom(2 * SEGMENT + 5000))
    data = path.read_bytes()
    cut = {"segment_boundary": crypto.HEADER_BYTES + 2 * SEGMENT, "mid_segment": crypto.HEADER_BYTES + SEGMENT + 300,
           "header_only": crypto.HEADER_BYTES, "tink_header_only": crypto.HEADER_BYTES + TINK_HEADER}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(crypto.DamagedFileError, match="damaged, truncated or was tampered with"):
        crypto.decrypt_to_bytes(path, KEY)


def test_reordered_or_extended_streams_are_refused(tmp_path):
    path = _encrypted(tmp_path, os.urandom(3 * SEGMENT + 5000))
    data = path.read_bytes()
    head, body = data[:crypto.HEADER_BYTES], data[crypto.HEADER_BYTES:]
    segments = [body[i:i + SEGMENT] for i in range(0, len(body), SEGMENT)]
    assert len(segments) == 4
    path.write_bytes(head + segments[0] + segments[2] + segments[1] + segments[3])
    with pytest.raises(crypto.DamagedFileError, match=f"after {SEGMENT - TINK_HEADER - 16} plaintext bytes"):
        crypto.decrypt_to_bytes(path, KEY)
    path.write_bytes(data + segments[1])
    with pytest.raises(crypto.DamagedFileError):
        crypto.decrypt_to_bytes(path, KEY)
    path.write_bytes(head + segments[0] + segments[1] + segments[3])  # a segment left out
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
    assert crypto.main(["upgrade", str(tmp_path / "enc.onnx"), str(tmp_path / "again.onnx")]) == 0
    assert crypto.decrypt_to_bytes(tmp_path / "again.onnx", KEY) == _tiny_onnx()
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
    real_resolve = cli.resolve_spec

    def spying_resolve_spec(*args, **kwargs):
        resolution = real_resolve(*args, **kwargs)
        captured["config"] = resolution.config
        return resolution

    monkeypatch.setattr(cli, "resolve_spec", spying_resolve_spec)
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


# ------------------------------------------------------------------------- crafted headers: bounded work

LEGACY = Path(__file__).parent / "data" / "encryption_v1" / "checkpoint.pth"


def _crafted(tmp_path: Path, version: int, cost: dict) -> Path:
    """A real file of ``version`` with its scrypt fields in the header replaced (offsets of each format)."""
    if version == 1:
        data = bytearray(LEGACY.read_bytes())
        for offset, name in ((10, "log2_n"), (11, "r"), (12, "p")):
            data[offset] = cost.get(name, data[offset])
    else:
        data = bytearray(_encrypted(tmp_path, b"model bytes", "source.bin").read_bytes())
        data[9] = cost["log2_n"]
    path = tmp_path / f"crafted-v{version}-{'-'.join(f'{k}{v}' for k, v in cost.items())}.pth"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("version,cost", [
    (1, {"log2_n": 0}), (1, {"log2_n": 255}), (1, {"log2_n": 22, "r": 32, "p": 16}), (1, {"r": 0}), (1, {"p": 0}),
    (1, {"r": 255}), (1, {"p": 255}), (2, {"log2_n": 0}), (2, {"log2_n": 14}), (2, {"log2_n": 19}),
    (2, {"log2_n": 255}),
])
def test_a_crafted_key_derivation_cost_is_refused_before_any_work(tmp_path, version, cost):
    path = _crafted(tmp_path, version, cost)
    for call in (lambda: crypto.check_key(path, KEY), lambda: crypto.decrypt_to_bytes(path, KEY),
                 lambda: read_checkpoint(path, encryption_key=KEY)):
        started = time.perf_counter()
        with pytest.raises((crypto.EncryptionError, CheckpointError)) as info:
            call()
        assert time.perf_counter() - started < 1.0, "refused from the header, without deriving a key"
        assert str(info.value).startswith(f"'{path}' asks for a key derivation out of bounds"), str(info.value)


def test_the_reader_stays_within_bounds_under_a_memory_limit(tmp_path):
    """The header the first format's reader accepted at most (scrypt N=2^22, r=32, p=16: 16 GiB) is refused
    by a process limited to 1 GiB of address space, quickly and with the sentence, not a MemoryError."""
    path = _crafted(tmp_path, 1, {"log2_n": 22, "r": 32, "p": 16})
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); " \
            "sys.argv = ['crypto', 'check', sys.argv[1]]; runpy.run_module('mask2former.crypto', run_name='__main__')"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", limit, str(path)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, crypto.KEY_ENV: KEY}, cwd=Path(__file__).parents[1])
    assert result.returncode == 1 and time.perf_counter() - started < 30
    assert f"error: '{path}' asks for a key derivation out of bounds" in result.stderr, result.stderr
