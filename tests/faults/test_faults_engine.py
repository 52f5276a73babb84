"""Faults where the scheduler adds nothing, injected into real processes, a real S3 server and a real file system:

* the S3 endpoint goes down (its socket closed: "connection refused") while the storage hook stages a job's
  data, and while it publishes a job folder, briefly (the hook's retries ride it out) and for good (a clear
  failure; ``_FINISHED`` absent until a later publish has every file);
* the disk fills up (a size-limited tmpfs mounted by the test) while ``python -m mask2former train`` writes
  its second checkpoint;
* truncated and damaged checkpoints, ONNX files and (encrypted) engine files given to the engine's CLI;
* SIGTERM to ``python -m mask2former export`` and ``quantize`` while they write their artifacts.

Each test records what it observed (``FAULTS_REPORT=faults.md`` writes the table RELIABILITY.md shows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evaluation_support import make_dataset, save_random_checkpoint, small_data_overrides, split_overrides, \
    tiny_model_overrides
from fault_support import S3Endpoint, Attempts, can_mount, fill, observed, sha256, small_filesystem, wait_for
from mask2former import crypto, results
from mask2former.cli import main
from train_support import REPO, make_data, tiny_spec, write_spec

pytestmark = pytest.mark.slow

KEY = "fault-suite-key/4Rt!basalt-heron-63"


def _words(overrides):
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]


def _engine(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != crypto.KEY_ENV}
    return subprocess.Popen([sys.executable, "-m", "mask2former", *args], cwd=str(REPO),
                            env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _last_status(folder: Path) -> dict:
    lines = results.read_status(folder)
    return lines[-1] if lines else {}


def _hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob(".*"))


# ------------------------------------------------------------------------------------------------ S3

@pytest.fixture(scope="module")
def s3():
    endpoint = S3Endpoint().start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def hook(s3, monkeypatch):
    """The storage hook through an ``aws_default`` connection to the endpoint, with the provider's default
    retries (what a deployment gets)."""
    from operators.hooks.storage import Mask2FormerStorageHook

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "AKIAFAULTS", "password": "faults-secret",
        "extra": {"endpoint_url": s3.url, "region_name": "us-east-1"}}))
    if not s3.up:
        s3.start()
    return Mask2FormerStorageHook(aws_conn_id="aws_default")


def _bucket(s3) -> str:
    name = f"faults-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=name)
    return name


def test_s3_down_during_staging_is_retried_then_fails_naming_the_object(s3, hook, tmp_path):
    from mask2former.data.staging import S3AccessError

    bucket = _bucket(s3)
    s3.client().put_object(Bucket=bucket, Key="train/annotations_panoptic.json", Body=b'{"images": []}')
    uri = f"s3://{bucket}/train/annotations_panoptic.json"
    attempts = Attempts(hook.get_conn())
    s3.stop()
    began = time.monotonic()
    with pytest.raises(S3AccessError) as failure:
        hook.stage({"dataset.train.panoptic_json": uri}, tmp_path / "cache", log=lambda line: None)
    seconds = time.monotonic() - began
    message = str(failure.value)
    tries = attempts.count("HeadObject")
    times = [t for t, op in attempts.sent if op == "HeadObject"]
    waits = [round(b - a, 2) for a, b in zip(times, times[1:])]
    assert uri in message and "dataset.train.panoptic_json" in message and "could not connect" in message.lower()
    assert tries == 8 and seconds >= 0.5, (tries, seconds, waits)
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing half-downloaded left in the cache

    s3.start()  # back: the same staging succeeds
    staged = hook.stage({"dataset.train.panoptic_json": uri}, tmp_path / "cache", log=lambda line: None)
    assert Path(staged.local_overrides["dataset.train.panoptic_json"]).read_bytes() == b'{"images": []}'
    observed("S3 endpoint down during staging", "the moto server's socket closed before `stage` (connection "
             "refused)", f"{tries} attempts over {seconds:.1f} s (waits {waits} s), then `{message}`; staged once "
             "the endpoint is back", "0 (nothing written to the cache)")


def _job_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "status.json").write_text('{"status": "SUCCESS"}\n')
    (root / "metrics.json").write_text('{"mIoU": 0.5}\n')
    for epoch in (1, 2, 3):
        (root / f"model_epoch_00{epoch}_step_00000{epoch}.pth").write_bytes(os.urandom(512 * 1024))
    return root


def _down_at_first_upload(s3, hook, *, back_after: float | None) -> Attempts:
    """Take the endpoint down as the first file upload is sent; bring it back ``back_after`` seconds later."""
    done = threading.Event()

    def on_send(operation, request):
        if operation in ("PutObject", "UploadPart") and "_FINISHED" not in request.url and not done.is_set():
            done.set()
            s3.stop()
            if back_after is not None:
                threading.Timer(back_after, s3.start).start()

    return Attempts(hook.get_conn(), on_send=on_send)


def _published(s3, bucket: str, prefix: str) -> dict:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"][len(prefix) + 1:]: item for item in listing}


def _digests_match(s3, bucket: str, prefix: str, local: Path) -> bool:
    import hashlib

    for path in local.iterdir():
        body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{path.name}")["Body"].read()
        if hashlib.sha256(body).hexdigest() != sha256(path):
            return False
    return True


def test_s3_down_briefly_during_publishing_is_retried_and_the_marker_comes_last(s3, hook, tmp_path):
    bucket = _bucket(s3)
    local = _job_folder(tmp_path / "job")
    attempts = _down_at_first_upload(s3, hook, back_after=1.0)
    began = time.monotonic()
    outcome = hook.publish(local, f"s3://{bucket}/results/job")
    seconds = time.monotonic() - began
    sent = [op for _, op in attempts.sent]
    objects = _published(s3, bucket, "results/job")
    assert outcome.uploaded_files == 5 and set(objects) == {p.name for p in local.iterdir()} | {"_FINISHED"}
    assert max(item["LastModified"] for item in objects.values()) == objects["_FINISHED"]["LastModified"]
    assert sent[-1] == "PutObject" and len(sent) > len(set(t for t, _ in attempts.sent)) - 1
    assert _digests_match(s3, bucket, "results/job", local)
    retried = len([op for op in sent if op == "PutObject"]) - 6  # 5 files and the marker
    assert retried >= 1
    observed("S3 endpoint down during publishing (1 s)", "the moto server's socket closed as the first file "
             "upload is sent, reopened 1 s later", f"{retried} upload request(s) retried; published in "
             f"{seconds:.1f} s, `_FINISHED` written last, every object's SHA-256 equal to its file", "0")


def test_s3_down_for_good_during_publishing_fails_and_never_shows_the_marker(s3, hook, tmp_path):
    from operators.hooks.storage import StorageUnavailable

    bucket = _bucket(s3)
    local = _job_folder(tmp_path / "job")
    dest = f"s3://{bucket}/results/job"
    hook.publish(local, dest)  # an earlier, complete publish
    (local / "model_epoch_004_step_000004.pth").write_bytes(os.urandom(512 * 1024))
    (local / "metrics.json").write_text('{"mIoU": 0.6}\n')
    _down_at_first_upload(s3, hook, back_after=None)
    began = time.monotonic()
    with pytest.raises(StorageUnavailable) as failure:
        hook.publish(local, dest)
    seconds = time.monotonic() - began
    message = str(failure.value)
    assert message.startswith(f"Publishing to {dest} failed: the S3 endpoint could not be reached")

    s3.start()
    assert "_FINISHED" not in _published(s3, bucket, "results/job")  # deleted before the first upload
    again = hook.publish(local, dest)  # the next publish completes it, sending only what changed
    assert (again.uploaded_files, again.skipped_files) == (2, 4)
    assert "_FINISHED" in _published(s3, bucket, "results/job") and _digests_match(s3, bucket, "results/job", local)
    observed("S3 endpoint down for good during publishing", "the moto server's socket closed as the first changed "
             "file's upload is sent", f"failed after {seconds:.1f} s of retries: `{message}`; no `_FINISHED` in the "
             "folder meanwhile; the next publish sent the 2 changed files and the marker", "0")


# ---------------------------------------------------------------------------------------------- disk

@pytest.mark.skipif(not can_mount(), reason="mounting a size-limited tmpfs needs root")
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    roots = make_data(tmp_path / "data", images=2, val_images=None, size=64)
    spec = write_spec(tmp_path / "train.yaml", tiny_spec(roots, num_epochs=3))
    with small_filesystem(tmp_path / "small", "64m") as disk:
        out = disk / "job"
        process = _engine("train", "-e", str(spec), "--results-dir", str(out))
        first = wait_for(lambda: next(out.glob("model_epoch_001_*.pth"), None), 300, "no first checkpoint")
        wait_for(lambda: not list(out.glob(".*.tmp")), 60, "the first checkpoint was not complete")
        before = sha256(first)
        fill(disk, leave=256 * 1024)  # status lines still fit; a 16 MB checkpoint does not
        output, _ = process.communicate(timeout=300)
        last = _last_status(out)
        assert process.returncode == 1 and last["status"] == "FAILURE", output[-3000:]
        assert last["message"].startswith(f"The disk is full (results in {out})") and "free space" in last["message"]
        assert sha256(first) == before and sorted(p.name for p in out.glob("*.pth")) == [first.name,
                                                                                        "model_latest.pth"]
        assert sha256(out / "model_latest.pth") == before and _hidden(out) == []  # no partial checkpoint left
        from mask2former.checkpoint import read_checkpoint

        assert read_checkpoint(first)["global_step"] == 1
    observed("disk full while writing a checkpoint", "a 64 MiB tmpfs mounted by the test holds the results; "
             "filled (posix_fallocate) to 256 KiB free once the first checkpoint is written",
             f"exit 1, status FAILURE: `{last['message'][:160]}...`; the epoch-1 checkpoint and model_latest.pth "
             "byte-identical, no partial file", "no saved byte; epoch 2's training, which could not be saved")


# ------------------------------------------------------------------------------------------ bad files

@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_images=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")


def _evaluate(folder, checkpoint, data):
    code = main(["evaluate", "--results-dir", str(folder), f"evaluate.checkpoint={checkpoint}",
                 *_words({**tiny_model_overrides(), **small_data_overrides(), **split_overrides("val", data)})])
    return code, _last_status(folder)


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], [0.5] * 4096)
    graph = helper.make_graph([helper.make_node("MatMul", ["inputs", "w"], ["out"])], "g",
                              [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64])], [weights])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_truncated_or_damaged_model_files_are_refused_naming_the_file(tmp_path, checkpoint, eval_data, monkeypatch):
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    damaged = tmp_path / "damaged.pth"
    middle = len(data) // 2
    damaged.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])  # inside a tensor: torch.load would load it
    encrypted = tmp_path / "encrypted.pth"
    crypto.encrypt_file(checkpoint, encrypted, KEY)
    flipped = bytearray(encrypted.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    (tmp_path / "encrypted-damaged.pth").write_bytes(bytes(flipped))
    outcomes = {}
    for name in ("truncated.pth", "damaged.pth"):
        outcomes[name] = _evaluate(tmp_path / name.replace(".", "-"), tmp_path / name, eval_data)
    monkeypatch.setenv(crypto.KEY_ENV, KEY)
    outcomes["encrypted-damaged.pth"] = _evaluate(tmp_path / "enc", tmp_path / "encrypted-damaged.pth", eval_data)
    monkeypatch.delenv(crypto.KEY_ENV)

    onnx_file = _tiny_onnx(tmp_path / "tiny.onnx").read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(onnx_file[:len(onnx_file) // 2])
    code = main(["inference", "--results-dir", str(tmp_path / "inf"),
                 f"inference.checkpoint={tmp_path / 'truncated.onnx'}",
                 f"dataset.test.img_dir={eval_data['img_dir']}", f"dataset.label_map={eval_data['label_map']}",
                 *_words({**tiny_model_overrides(), **small_data_overrides()})])
    outcomes["truncated.onnx"] = (code, _last_status(tmp_path / "inf"))

    from mask2former.actions.job import ActionError
    from mask2former.checkpoint import write_model_bytes
    from mask2former.runtime.tensorrt_runner import deserialize_engine

    engine = tmp_path / "model.engine"
    write_model_bytes(engine, os.urandom(4096), KEY)  # an encrypted engine's bytes, then cut short
    engine.write_bytes(engine.read_bytes()[:-100])
    with pytest.raises(ActionError) as refused:
        deserialize_engine(None, engine, encryption_key=KEY)  # refused before TensorRT is asked
    outcomes["truncated encrypted model.engine"] = (1, {"status": "FAILURE", "message": str(refused.value)})

    for name, (code, last) in outcomes.items():
        assert code == 1 and last["status"] == "FAILURE", (name, last)
        named = name.split()[-1]
        assert named in last["message"] and "Traceback" not in last["message"], (name, last)
    assert "fails its CRC-32 check" in outcomes["damaged.pth"][1]["message"]
    how = {"truncated.pth": "a checkpoint cut in half, to `evaluate`",
           "damaged.pth": "a checkpoint with 64 bytes zeroed inside a tensor, to `evaluate`",
           "encrypted-damaged.pth": "an encrypted checkpoint with one bit flipped, to `evaluate`",
           "truncated.onnx": "an ONNX file cut in half, to `inference`",
           "truncated encrypted model.engine": "an encrypted engine file missing its last 100 bytes, to the "
                                               "engine loader (TensorRT itself needs a GPU)"}
    for name, (code, last) in outcomes.items():
        message = last["message"].replace(str(tmp_path), "<tmp>")
        observed(f"corrupt file: {name}", how[name], f"exit 1, status FAILURE: `{message[:170]}`", "n/a")


# ------------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_during_export_and_quantize_leaves_no_finished_looking_artifact(tmp_path, checkpoint):
    model = _words(tiny_model_overrides())
    size = ["dataset.augmentation.test_min_size=64", "dataset.augmentation.test_max_size=64"]
    jobs = {
        "export": (tmp_path / "export", "simplifying the graph", "model.onnx",
                   ["export", "--results-dir", str(tmp_path / "export"), f"export.checkpoint={checkpoint}",
                    "export.input_height=64", "export.input_width=64", *model]),
        "quantize": (tmp_path / "quantize", "quantizing", "quantized_model_torchao.pth",
                     ["quantize", "--results-dir", str(tmp_path / "quantize"), f"quantize.model_path={checkpoint}",
                      *model, *size]),
    }
    processes = {name: _engine(*args) for name, (_, _, _, args) in jobs.items()}  # both at once

    def reached(name):
        folder, phase = jobs[name][0], jobs[name][1]
        lines = results.read_status(folder) if (folder / results.STATUS_FILE).is_file() else []
        return any(line["message"].startswith(phase) for line in lines)

    waiting = set(jobs)
    deadline = time.monotonic() + 300
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            if reached(name):
                processes[name].send_signal(signal.SIGTERM)
                waiting.discard(name)
            elif processes[name].poll() is not None:
                pytest.fail(f"{name} ended before its phase: {processes[name].communicate()[0][-3000:]}")
        time.sleep(0.01)
    assert not waiting, f"never reached their phase: {waiting}"
    for name, (folder, phase, artifact, _) in jobs.items():
        output, _ = processes[name].communicate(timeout=120)
        last = _last_status(folder)
        assert processes[name].returncode == 1, output[-3000:]
        assert last["status"] == "FAILURE" and "received signal SIGTERM" in last["message"], last
        assert _hidden(folder) == [], _hidden(folder)  # no temporary file or folder left
        assert not (folder / artifact).exists() or _complete(folder / artifact)
        assert not (folder / f"{name}_report.json").exists()
        left = sorted(p.name for p in folder.iterdir())
        observed(f"SIGTERM during {name}", f"`kill -TERM` to `python -m mask2former {name}` as status.json says "
                 f"'{phase}...'", f"exit 1, status FAILURE `{last['message']}`; folder holds {left}", "n/a")


def _complete(path: Path) -> bool:
    """An artifact written whole (its zip checksums hold), as the atomic writers promise."""
    from mask2former.checkpoint import verify_checksums

    verify_checksums(path)
    return True
