"""The command line: help per action, exit status 2 for bad specs before anything is read, schemas --check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mask2former import cli
from mask2former.config import ACTIONS
from mask2former.config import generate

ROOT = Path(__file__).resolve().parents[1]


def test_every_action_is_offered_with_its_help(capsys):
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    for action in ACTIONS:
        assert action in listing
        assert cli.main([action, "--help"]) == 0
        assert "key=value" in capsys.readouterr().out


BAD = [
    (["train", "train.num_epoch=3"], "train.num_epochs"),
    (["train", "model.mode=panoptik"], "'model.mode': got 'panoptik'"),
    (["train", "train.optim.lr=-1"], "'train.optim.lr'"),
    (["export", "export.checkpoint=m.pth", "export.input_width=100"], "'export.input_width'"),
    (["gen_trt_engine", "gen_trt_engine.onnx_file=m.onnx", "gen_trt_engine.tensorrt.data_type=INT8"],
     "FP32 and FP16 only"),
    (["evaluate", "evaluate.checkpoint=a.pth", "dataset.val.img_dir=s3://nowhere/x.tar.gz"],
     "model.mode panoptic needs dataset.val.panoptic_json"),
    (["train", "notakey"], "is not of the form key=value"),
]


@pytest.mark.parametrize("argv,expected", BAD)
def test_bad_specs_exit_2_naming_the_key_and_write_nothing(argv, expected, tmp_path, capsys):
    results_dir = tmp_path / "job"
    assert cli.main([argv[0], "--results-dir", str(results_dir), *argv[1:]]) == 2
    assert expected in capsys.readouterr().err
    assert not results_dir.exists()


def test_a_bad_spec_exits_2_from_a_real_process_before_reading_s3(tmp_path):
    """No S3 endpoint exists here: any attempt to read the data would hang or fail differently."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "mask2former", "train", "--results-dir", str(tmp_path / "job"),
                           "dataset.train.img_dir=s3://bucket/train/images.tar.gz", "train.num_epochs=0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "'train.num_epochs': got 0" in done.stderr
    assert not (tmp_path / "job").exists()


def test_a_failed_action_ends_status_with_failure_and_exit_1(tmp_path, capsys):
    results_dir = tmp_path / "job"
    code = cli.main(["export", "--results-dir", str(results_dir), f"export.checkpoint={tmp_path / 'missing.pth'}"])
    assert code == 1
    lines = [json.loads(l) for l in (results_dir / "status.json").read_text().splitlines()]
    assert lines[0]["status"] == "STARTED" and lines[-1]["status"] == "FAILURE"
    assert "missing.pth" in lines[-1]["message"]
    assert (results_dir / "experiment.yaml").is_file()


def test_schemas_check_passes_on_the_committed_files_and_fails_when_stale(tmp_path, capsys):
    assert cli.main(["schemas", "--check"]) == 0
    assert cli.main(["schemas", "--root", str(tmp_path)]) == 0
    assert generate.stale_files(tmp_path) == []
    template = tmp_path / "specs" / "spec_template_train.yaml"
    template.write_text(template.read_text().replace("num_epochs: 10", "num_epochs: 11"))
    assert cli.main(["schemas", "--check", "--root", str(tmp_path)]) == 1
    assert "specs/spec_template_train.yaml" in capsys.readouterr().err
