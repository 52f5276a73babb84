"""Crafted encrypted-model headers, through the evaluate CLI: a key derivation cost of 0 or far above the
bound, in either format, ends the job with one sentence naming the file, before any key is derived."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile_support import Sandbox, assert_refused
from mask2former import crypto

LEGACY = Path(__file__).resolve().parents[1] / "data" / "encryption_v1" / "checkpoint.pth"
KEY = "legacy-format-v1-test-key"


def _crafted(sandbox: Sandbox, version: int, offsets: dict) -> Path:
    if version == 1:
        data = bytearray(LEGACY.read_bytes())
    else:
        plain = sandbox.data / "plain.bin"
        plain.write_bytes(b"not a checkpoint, never read")
        crypto.encrypt_file(plain, sandbox.data / "v2.bin", KEY)
        data = bytearray((sandbox.data / "v2.bin").read_bytes())
    for offset, value in offsets.items():
        data[offset] = value
    path = sandbox.data / "model.pth"
    path.write_bytes(bytes(data))
    return path


CASES = {
    "format 1, scrypt cost N=2^0": (1, {10: 0}),
    "format 1, scrypt N=2^22, r=32, p=16 (16 GiB)": (1, {10: 22, 11: 32, 12: 16}),
    "format 2, scrypt cost N=2^0": (2, {9: 0}),
    "format 2, scrypt cost N=2^255": (2, {9: 255}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_key_derivation_cost_ends_the_job_naming_the_file(sandbox, monkeypatch, case):
    version, offsets = CASES[case]
    path = _crafted(sandbox, version, offsets)
    monkeypatch.setenv(crypto.KEY_ENV, KEY)
    spec = sandbox.train_spec("coco_panoptic")
    spec["dataset"]["val"] = spec["dataset"].pop("train")
    spec.pop("train")
    outcome = sandbox.run_cli("evaluate", [f"evaluate.checkpoint={path}"], spec=spec)
    assert_refused(outcome, f"^'{path}' asks for a key derivation out of bounds", case=f"encrypted model: {case}",
                   door="evaluate CLI", max_seconds=30)
