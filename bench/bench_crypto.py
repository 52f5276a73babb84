"""Benchmark: encrypting and decrypting a model file, Tink streaming AEAD (format 2) against the format it
replaced (format 1, our own AES-GCM chunks, run from git at ``--v1-commit``) and against age with a
passphrase (pyrage), the other candidate.

Each operation runs in its own worker process (so its peak RSS is its own), formats alternating, for
``--rounds`` rounds; times are the best round, memory the largest rise of the worker's peak RSS over its
RSS just before the operation. The file is random (incompressible, like trained weights). The key
derivation is part of each operation; its time, measured in the same worker just before, is listed apart and
taken out of the throughput (for age it cannot be split: pyrage calibrates and derives inside one call).
Writes ``bench/results/crypto.json``.

    .venv/bin/python bench/bench_crypto.py [--mb 256] [--rounds 3] [--v1-commit 368794b]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "bench-passphrase-0123456789"
FORMATS = ("v1", "tink", "age")
OPERATIONS = ("encrypt_file", "decrypt_file", "decrypt_to_bytes")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _load_v1(commit: str):
    """The format-1 module as it was at ``commit`` (its writer is gone from the tree)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:mask2former/crypto.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "crypto_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("crypto_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crypto_v1"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _operation(fmt: str, op: str, src: Path, dst: Path, v1_commit: str):
    """A zero-argument callable doing ``op`` in format ``fmt``, with its imports already done."""
    if fmt == "age":
        import pyrage

        if op == "encrypt_file":
            return lambda: dst.write_bytes(pyrage.passphrase.encrypt(src.read_bytes(), KEY))
        if op == "decrypt_file":
            return lambda: dst.write_bytes(pyrage.passphrase.decrypt(src.read_bytes(), KEY))
        return lambda: pyrage.passphrase.decrypt(src.read_bytes(), KEY)
    if fmt == "v1":
        module = _load_v1(v1_commit)
    else:
        from mask2former import crypto as module

        import tink  # noqa: F401 - imported before the RSS baseline, like cryptography for v1
    if op == "encrypt_file":
        return lambda: module.encrypt_file(src, dst, KEY)
    if op == "decrypt_file":
        return lambda: module.decrypt_file(src, dst, KEY)
    return lambda: module.decrypt_to_bytes(src, KEY)


def _derivation_seconds(fmt: str, v1_commit: str) -> float:
    """One scrypt derivation at the cost ``fmt``'s writer uses (age's is calibrated inside pyrage: not split)."""
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from mask2former import crypto

    if fmt == "age":
        return 0.0
    log2_n = _load_v1(v1_commit).SCRYPT_LOG2_N if fmt == "v1" else crypto.SCRYPT_LOG2_N
    started = time.perf_counter()
    Scrypt(salt=os.urandom(16), length=64, n=2 ** log2_n, r=8, p=1).derive(KEY.encode())
    return time.perf_counter() - started


def worker(fmt: str, op: str, src: Path, dst: Path, v1_commit: str) -> Dict[str, Any]:
    derivation = _derivation_seconds(fmt, v1_commit)
    run = _operation(fmt, op, src, dst, v1_commit)
    before = _rss_bytes()
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del result
    return {"seconds": seconds, "derivation_seconds": derivation, "peak_rise_bytes": max(0, peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--v1-commit", default="368794b")
    parser.add_argument("--worker", nargs=4, metavar=("FORMAT", "OP", "SRC", "DST"))
    args = parser.parse_args()
    if args.worker:
        fmt, op, src, dst = args.worker
        print(json.dumps(worker(fmt, op, Path(src), Path(dst), args.v1_commit)))
        return

    size = args.mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    plain = work / "model.pth"
    with open(plain, "wb") as handle:
        for _ in range(args.mb):
            handle.write(os.urandom(1024 * 1024))
    encrypted = {fmt: work / f"model.{fmt}" for fmt in FORMATS}
    results: Dict[str, Dict[str, Dict[str, Any]]] = {fmt: {op: {"seconds": [], "derivation_seconds": [],
                                                                "peak_rise_bytes": []}
                                                           for op in OPERATIONS} for fmt in FORMATS}
    for _ in range(args.rounds):
        for op in OPERATIONS:
            for fmt in FORMATS:
                src, dst = (plain, encrypted[fmt]) if op == "encrypt_file" else (encrypted[fmt], work / "out.bin")
                line = subprocess.run([sys.executable, __file__, "--v1-commit", args.v1_commit, "--worker", fmt, op,
                                       str(src), str(dst)], check=True, capture_output=True, text=True).stdout
                measured = json.loads(line)
                for key, value in measured.items():
                    results[fmt][op][key].append(value)
                if op == "decrypt_file":
                    assert (work / "out.bin").stat().st_size == size, (fmt, "decrypted size")
                    (work / "out.bin").unlink()
    summary = {fmt: {op: _summary(m, args.mb) for op, m in ops.items()} for fmt, ops in results.items()}
    import cryptography
    from importlib.metadata import version

    report = {"file_mb": args.mb, "rounds": args.rounds, "v1_commit": args.v1_commit, "summary": summary,
              "raw": results,
              "machine": {"cpu": _cpu_model(), "python": platform.python_version(),
                          "tink": version("tink"), "pyrage": version("pyrage"),
                          "cryptography": cryptography.__version__, "load_average": os.getloadavg()}}
    out = REPO / "bench" / "results" / "crypto.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.mb} MiB random file, best of {args.rounds}: seconds (key derivation in brackets), MiB/s without "
          "the derivation, peak RSS rise of the worker during the operation")
    print(f"| operation | {' | '.join(FORMATS)} |")
    for op in OPERATIONS:
        cells = [f"{summary[f][op]['best_seconds']:.2f} s ({summary[f][op]['derivation_seconds']:.2f}), "
                 f"{summary[f][op]['stream_mib_per_s']:.0f} MiB/s, {summary[f][op]['peak_rise_mib']:.0f} MiB"
                 for f in FORMATS]
        print(f"| {op} | {' | '.join(cells)} |")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


def _summary(measured: Dict[str, list], mb: int) -> Dict[str, float]:
    best = min(range(len(measured["seconds"])), key=lambda i: measured["seconds"][i])
    seconds, derivation = measured["seconds"][best], measured["derivation_seconds"][best]
    return {"best_seconds": seconds, "derivation_seconds": derivation,
            "stream_mib_per_s": mb / max(seconds - derivation, 1e-9),
            "peak_rise_mib": max(measured["peak_rise_bytes"]) / 2 ** 20}


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
