"""Files written by the first encrypted-model format (version 1, before Tink) still open: the files in
tests/data/encryption_v1 were written by that code and are kept as they are."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from mask2former import crypto, crypto_legacy
from mask2former.checkpoint import CheckpointError, check_checkpoint_key, read_checkpoint

DATA = Path(__file__).parent / "data" / "encryption_v1"
KEY = "legacy-format-v1-test-key"
THREE_CHUNKS_SHA256 = "76eb535afc3df88d156c51a81e971ab714caef67d2434d692e6fa43dadc586ad"


@pytest.fixture
def legacy(tmp_path) -> Path:
    folder = tmp_path / "v1"
    shutil.copytree(DATA, folder)
    return folder


def test_the_committed_files_are_format_1():
    for name in ("checkpoint.pth", "three_chunks.bin"):
        head = (DATA / name).read_bytes()[:9]
        assert head == crypto.MAGIC + b"\x01", name


def test_a_format_1_checkpoint_reads_with_its_key(legacy):
    check_checkpoint_key(legacy / "checkpoint.pth", KEY)
    payload = read_checkpoint(legacy / "checkpoint.pth", encryption_key=KEY)
    assert torch.equal(payload["state_dict"]["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert payload["label_map"][0]["name"] == "legacy" and (payload["epoch"], payload["global_step"]) == (2, 7)


def test_a_multi_chunk_format_1_file_decrypts_byte_for_byte(legacy):
    data = crypto.decrypt_to_bytes(legacy / "three_chunks.bin", KEY)
    assert data == bytes(range(256)) * 14 and hashlib.sha256(data).hexdigest() == THREE_CHUNKS_SHA256
    crypto.decrypt_file(legacy / "three_chunks.bin", legacy / "plain.bin", KEY)
    assert (legacy / "plain.bin").read_bytes() == data


def test_format_1_refusals_name_the_file(legacy):
    path = legacy / "checkpoint.pth"
    with pytest.raises(CheckpointError, match=f"^The encryption key is wrong for '{path}'"):
        read_checkpoint(path, encryption_key="not the key")
    with pytest.raises(CheckpointError, match=f"^'{path}' is encrypted and no encryption key was given"):
        read_checkpoint(path)
    chunks = legacy / "three_chunks.bin"
    data = bytearray(chunks.read_bytes())
    data[crypto_legacy.HEADER_BYTES + 1016 + 3] ^= 1  # inside chunk 1
    chunks.write_bytes(bytes(data))
    with pytest.raises(crypto.DamagedFileError, match=f"'{chunks}' is damaged.*encrypted chunk 1 fails"):
        crypto.decrypt_to_bytes(chunks, KEY)
    chunks.write_bytes(bytes(data[:crypto_legacy.HEADER_BYTES + 2 * 1016]))
    with pytest.raises(crypto.DamagedFileError, match=f"'{chunks}'"):
        crypto.decrypt_to_bytes(chunks, KEY)


def test_upgrade_rewrites_a_format_1_file_in_the_current_format(legacy, monkeypatch):
    monkeypatch.setenv(crypto.KEY_ENV, KEY)
    assert crypto.main(["upgrade", str(legacy / "checkpoint.pth")]) == 0
    upgraded = legacy / "checkpoint.pth"
    assert upgraded.read_bytes()[:9] == crypto.MAGIC + bytes([crypto.VERSION])
    assert read_checkpoint(upgraded, encryption_key=KEY)["global_step"] == 7
    monkeypatch.setenv(crypto.KEY_ENV, "wrong")
    before = (legacy / "three_chunks.bin").read_bytes()
    assert crypto.main(["upgrade", str(legacy / "three_chunks.bin")]) == 1
    assert (legacy / "three_chunks.bin").read_bytes() == before, "a refused upgrade changes nothing"
