"""Encrypted models carried between jobs, end to end through the CLI (``mask2former.cli.main`` in this process,
the key in MASK2FORMER_ENCRYPTION_KEY as the operators pass it):

train (encrypted checkpoints) -> evaluate the checkpoint -> inference with the label map recorded in the
encrypted checkpoint -> export (encrypted model.onnx) -> evaluate the ONNX model -> quantize (encrypted
quantized_model_torchao.pth) -> evaluate the quantized model. Every model file written is encrypted; a wrong
or missing key ends a job with one sentence naming the file (exit 1, FAILURE) before any other work and
overwrites nothing; the key, and every 8-character piece of it, is absent from every file of every results
folder and from everything the jobs printed or logged.

The GPU-only gen_trt_engine is checked piece by piece against the TensorRT stand-in of tests/test_trt_plan.py:
the parser receives the decrypted ONNX bytes, the engine is written encrypted and the runner's deserializer
gets it back decrypted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List

import pytest
import yaml

from mask2former import crypto, results
from mask2former.actions.job import ActionError
from mask2former.cli import main

KEY = "rt-Key/7fQz!plum-harbor-92"
WRONG_KEY = "wrong-Key/plum-harbor-93"
SIZE = 64
TINY_MODEL = {
    "mode": "panoptic",
    "backbone": {"swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "drop_path_rate": 0.0}},
    "sem_seg_head": {"num_classes": 13, "convs_dim": 32, "mask_dim": 32, "transformer_enc_layers": 1},
    "mask_former": {"num_object_queries": 10, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64,
                    "dec_layers": 3, "train_num_points": 256},
}


def _split(root: Path) -> Dict[str, object]:
    return {"type": "coco_panoptic", "img_dir": str(root / "images.tar.gz"),
            "panoptic_json": str(root / "annotations_panoptic.json"),
            "panoptic_dir": str(root / "images_panoptic.tar.gz"), "batch_size": 2, "num_workers": 0}


def _augmentation() -> Dict[str, object]:
    return {"train_min_size": [SIZE], "train_max_size": SIZE * 2, "train_crop_size": [SIZE, SIZE],
            "test_min_size": SIZE, "test_max_size": SIZE * 2}


def _write_specs(folder: Path, data: Path) -> Dict[str, Path]:
    """One spec file per action (each action reads only its own sections)."""
    dataset = {"val": _split(data / "val"), "label_map": str(data / "train" / "label_map_panoptic.json"),
               "augmentation": _augmentation()}
    specs = {
        "train": {"model": TINY_MODEL, "dataset": {**dataset, "train": _split(data / "train")},
                  "train": {"num_epochs": 1, "seed": 3}},
        "evaluate": {"model": TINY_MODEL, "dataset": dataset},
        # no dataset.label_map: inference takes the one recorded in the (encrypted) checkpoint
        "inference": {"model": TINY_MODEL, "dataset": {"test": {"img_dir": str(data / "val" / "images.tar.gz"),
                                                                "num_workers": 0},
                                                       "augmentation": _augmentation()},
                      "inference": {"save_overlays": False}},
        "export": {"model": TINY_MODEL, "export": {"input_height": SIZE, "input_width": SIZE, "batch_size": 1}},
        "quantize": {"model": TINY_MODEL, "dataset": dataset, "quantize": {"backend": "torchao"}},
    }
    paths = {}
    for action, spec in specs.items():
        paths[action] = folder / f"{action}.yaml"
        paths[action].write_text(yaml.safe_dump(spec, sort_keys=False))
    return paths


class Output:
    """Everything the jobs print (file descriptors 1 and 2, so C-level writes too) and log."""

    def __init__(self) -> None:
        self.text = ""

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        printed, logged = io.StringIO(), io.StringIO()
        handler = logging.StreamHandler(logged)
        handler.setLevel(logging.DEBUG)
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                root.removeHandler(handler)
                root.setLevel(level)
                sink.seek(0)
                self.text += sink.read().decode(errors="replace") + printed.getvalue() + logged.getvalue()


def _run(output: Output, args: List[str], *, key) -> int:
    with pytest.MonkeyPatch.context() as patch:
        if key is None:
            patch.delenv(crypto.KEY_ENV, raising=False)
        else:
            patch.setenv(crypto.KEY_ENV, key)
        with output.capture():
            return main(args)


def _hashes(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The encrypted pipeline, run once: (folders, codes, output)."""
    root = tmp_path_factory.mktemp("encrypted")
    data = root / "data"
    subprocess.run([sys.executable, "-m", "mask2former.data.synthetic", str(data), "--format", "coco_panoptic",
                    "--images", "4", "--val-images", "2", "--size", str(SIZE), "--seed", "0"], check=True,
                   capture_output=True)
    specs = _write_specs(root, data)
    out = root / "results"
    output = Output()
    folders = {name: out / name for name in ("train", "evaluate", "inference", "export", "evaluate_onnx",
                                             "quantize", "evaluate_quantized")}
    steps = [
        ("train", "train", []),
        ("evaluate", "evaluate", [f"evaluate.checkpoint={folders['train']}"]),
        ("inference", "inference", [f"inference.checkpoint={folders['train']}"]),
        ("export", "export", [f"export.checkpoint={folders['train']}"]),
        ("evaluate_onnx", "evaluate", [f"evaluate.onnx_file={folders['export']}"]),
        ("quantize", "quantize", [f"quantize.model_path={folders['train']}"]),
        ("evaluate_quantized", "evaluate", [f"evaluate.checkpoint={folders['quantize']}/quantized_model_torchao.pth"]),
    ]
    codes = {}
    for name, action, words in steps:
        codes[name] = _run(output, [action, "-e", str(specs[action]), "--results-dir", str(folders[name]), *words],
                           key=KEY)
    return SimpleNamespace(root=root, out=out, specs=specs, folders=folders, codes=codes, output=output)


def _last(folder: Path) -> dict:
    return results.read_status(folder)[-1]


def test_every_job_of_the_encrypted_pipeline_succeeds(jobs):
    for name, code in jobs.codes.items():
        assert code == 0, (name, _last(jobs.folders[name]))
        assert _last(jobs.folders[name])["status"] == "SUCCESS"
    for name in ("evaluate", "evaluate_onnx", "evaluate_quantized"):
        assert "mIoU" in _last(jobs.folders[name])["kpi"], name
    inference = jobs.folders["inference"]
    assert (inference / "panoptic.json").is_file() and len(list((inference / "panoptic").glob("*.png"))) == 2


def test_every_model_file_written_is_encrypted(jobs):
    models = [jobs.folders["train"] / "model_latest.pth", *jobs.folders["train"].glob("model_epoch_*.pth"),
              jobs.folders["export"] / "model.onnx", jobs.folders["quantize"] / "quantized_model_torchao.pth"]
    assert len(models) == 4
    for path in models:
        assert crypto.is_encrypted(path), path
        crypto.check_key(path, KEY)
    assert not [p for p in jobs.out.rglob(".*") if p.is_file() or p.is_dir()]  # no plaintext work copies left


@pytest.mark.parametrize("case", [
    pytest.param(("evaluate", "evaluate.checkpoint", "train", WRONG_KEY), id="evaluate-checkpoint-wrong-key"),
    pytest.param(("evaluate", "evaluate.onnx_file", "export", WRONG_KEY), id="evaluate-onnx-wrong-key"),
    pytest.param(("evaluate", "evaluate.checkpoint", "quantize", None), id="evaluate-quantized-no-key"),
    pytest.param(("inference", "inference.checkpoint", "train", WRONG_KEY), id="inference-wrong-key"),
    pytest.param(("export", "export.checkpoint", "train", WRONG_KEY), id="export-wrong-key"),
    pytest.param(("quantize", "quantize.model_path", "train", WRONG_KEY), id="quantize-wrong-key"),
])
def test_a_wrong_or_missing_key_is_refused_in_one_sentence_before_any_work(jobs, case):
    action, key_name, parent, key = case
    source = jobs.folders[parent]
    if parent == "quantize":
        source = source / "quantized_model_torchao.pth"
    model = {"train": jobs.folders["train"] / "model_epoch_001_step_000002.pth",
             "export": jobs.folders["export"] / "model.onnx", "quantize": source}[parent]
    words = [f"{key_name}={source}"]
    if action == "export":  # aim at the existing model.onnx: a refused export must leave it as it is
        words.append(f"export.onnx_file={jobs.folders['export'] / 'model.onnx'}")
    before = _hashes(jobs.out)
    folder = jobs.out / f"refused-{action}-{parent}-{'none' if key is None else 'wrong'}"

    code = _run(jobs.output, [action, "-e", str(jobs.specs[action]), "--results-dir", str(folder), *words], key=key)

    assert code == 1
    lines = results.read_status(folder)
    assert [line["status"] for line in lines] == ["STARTED", "FAILURE"]
    expected = (f"The encryption key is wrong for '{model}': it does not open this file (give the key it was "
                "encrypted with).") if key else (
        f"'{model}' is encrypted and no encryption key was given: set encryption_key in the spec or the "
        f"environment variable {crypto.KEY_ENV}.")
    assert lines[-1]["message"] == expected
    assert sorted(p.name for p in folder.iterdir()) == ["experiment.yaml", "status.json"]  # nothing else done
    after = _hashes(jobs.out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten


# --------------------------------------------------------------- gen_trt_engine against the TensorRT stand-in


def test_trt_builder_parses_the_decrypted_onnx_and_writes_an_encrypted_engine(jobs):
    import onnx

    from mask2former.config import load_spec
    from mask2former.runtime.tensorrt_runner import deserialize_engine
    from mask2former.tensorrt.builder import EngineBuildError, build_engine
    from mask2former.tensorrt.plan import make_build_plan
    from test_trt_plan import StandInTensorRT

    onnx_file = jobs.folders["export"] / "model.onnx"
    plaintext = crypto.decrypt_to_bytes(onnx_file, KEY)
    work = jobs.out / "stand-in-trt"

    section = load_spec("gen_trt_engine", overrides={"gen_trt_engine.onnx_file": str(onnx_file)}).gen_trt_engine
    plan = make_build_plan(section, onnx_file=onnx_file, engine_file=work / "model.engine",
                           onnx_model=onnx.load_model_from_string(plaintext))
    trt = StandInTensorRT()
    build_engine(plan, trt=trt, encryption_key=KEY)
    assert trt.parsed == [plaintext] and ("parse", str(onnx_file)) in trt.calls
    engine_file = work / "model.engine"
    assert crypto.is_encrypted(engine_file)
    assert crypto.decrypt_to_bytes(engine_file, KEY) == b"stand-in engine"

    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: ("engine from", bytes(data)))
    assert deserialize_engine(runtime, engine_file, encryption_key=KEY) == ("engine from", b"stand-in engine")
    with pytest.raises(ActionError, match=r"^The encryption key is wrong for '.*model\.engine'"):
        deserialize_engine(runtime, engine_file, encryption_key=WRONG_KEY)
    with pytest.raises(EngineBuildError, match="encryption key is wrong"):
        build_engine(plan, trt=StandInTensorRT(), engine_file=str(work / "other.engine"), encryption_key=WRONG_KEY)
    assert not (work / "other.engine").exists()


def test_gen_trt_engine_refuses_a_wrong_key_before_parsing(jobs, monkeypatch):
    """On this CPU machine the action stops at the GPU check; past it (a stand-in TensorRT), the key comes next."""
    from mask2former.actions import gen_trt_engine
    from test_trt_plan import StandInTensorRT

    trt = StandInTensorRT()
    monkeypatch.setattr(gen_trt_engine, "require_tensorrt", lambda: trt)
    folder = jobs.out / "refused-gen_trt_engine"
    code = _run(jobs.output, ["gen_trt_engine", "--results-dir", str(folder),
                              f"gen_trt_engine.onnx_file={jobs.folders['export']}"], key=WRONG_KEY)
    assert code == 1
    assert _last(folder)["message"] == (f"The encryption key is wrong for '{jobs.folders['export'] / 'model.onnx'}': "
                                        "it does not open this file (give the key it was encrypted with).")
    assert trt.calls == [] and not (folder / "model.engine").exists()


# --------------------------------------------------------------- the key leaks nowhere (keep this test last)


def test_the_key_appears_in_no_results_file_and_no_output(jobs):
    """Runs last in this module (pytest keeps file order): every job's folder and output are included."""
    assert jobs.output.text and "evaluate finished" in jobs.output.text  # the capture did capture
    pieces = {secret[i:i + 8] for secret in (KEY, WRONG_KEY) for i in range(len(secret) - 7)}
    files = [p for p in jobs.out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        leaked = [piece for piece in pieces if piece.encode() in data]
        assert not leaked, (path, leaked)
    assert not [piece for piece in pieces if piece in jobs.output.text]
    for folder in jobs.folders.values():
        spec = yaml.safe_load((folder / "experiment.yaml").read_text())
        assert "encryption_key" not in spec
