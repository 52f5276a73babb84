"""A TAO user's spec files work unchanged: one spec serves every action, every TAO key is accepted with TAO's
default, and TAO's keys mean what they mean in TAO (pixel statistics on the 0..1 scale, case-insensitive
enums, ``???`` as "not set", per-action results folders)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from mask2former.cli import main
from mask2former.config import ACTION_SECTIONS, ACTIONS, SpecError, load_spec, resolve_spec
from mask2former.config.experiment import COMMON_KEYS
from mask2former.config.loader import nearest_keys
from mask2former.config.schema import dataclass_schema, iter_leaves
from mask2former.config.experiment import ExperimentConfig

TAO_SPECS = Path(__file__).parent / "data" / "tao_specs"
TAO_KEYS: Dict[str, Any] = yaml.safe_load((TAO_SPECS / "tao_keys.yaml").read_text())
OUR_KEYS = dict(iter_leaves(dataclass_schema(ExperimentConfig)))
SPLITS = ("train", "val", "test")

# TAO keys whose support lands with other work: TAO's ADE dataset format and EfficientViT backbone.
OWNED_ELSEWHERE = {
    **{f"dataset.{s}.{k}": "the ade dataset format" for s in SPLITS for k in ("type", "annot_file", "root_dir")},
    **{key: "the EfficientViT backbone" for key in TAO_KEYS if key.startswith("model.backbone.efficientvit.")},
}

# Just enough of each action's spec for its cross-key rules to pass (no file is read when a spec is loaded).
BASE = {
    "train": {"dataset.train.img_dir": "/d/images", "dataset.train.panoptic_json": "/d/p.json",
              "dataset.train.panoptic_dir": "/d/p", "dataset.label_map": "/d/label_map.json"},
    "evaluate": {"evaluate.checkpoint": "/m.pth", "dataset.val.img_dir": "/d/images",
                 "dataset.val.panoptic_json": "/d/p.json", "dataset.val.panoptic_dir": "/d/p",
                 "dataset.label_map": "/d/label_map.json"},
    "inference": {"inference.checkpoint": "/m.pth", "dataset.test.img_dir": "/d/images"},
    "export": {"export.checkpoint": "/m.pth"},
    "quantize": {"quantize.model_path": "/m.pth"},
    "gen_trt_engine": {"gen_trt_engine.onnx_file": "/m.onnx"},
}


def _readers(key: str) -> List[str]:
    top = key.split(".", 1)[0]
    return [a for a in ACTIONS if top in COMMON_KEYS or top in ACTION_SECTIONS[a]]


def _not_set_error(key: str, error: SpecError) -> bool:
    """TAO's default of a required key is '???' or '': the action asks for the key, naming it."""
    return key in str(error) and ("not set" in str(error) or "is needed" in str(error))


def test_the_tao_key_list_is_tao_config_with_188_keys():
    assert len(TAO_KEYS) == 188
    owned_here = [k for k in TAO_KEYS if k not in OWNED_ELSEWHERE]
    missing = [k for k in owned_here if k not in OUR_KEYS]
    assert not missing, f"TAO keys not in the schema: {missing}"


def _supported(key: str) -> bool:
    """Whether the schema takes ``key`` at TAO's default (the ADE and EfficientViT keys arrive with other work)."""
    if key not in OUR_KEYS:
        return False
    enum = OUR_KEYS[key].get("enum")
    return enum is None or TAO_KEYS[key] in enum or not isinstance(TAO_KEYS[key], str)


@pytest.mark.parametrize("key", list(TAO_KEYS))
def test_each_tao_key_alone_at_taos_default_is_accepted_by_the_actions_reading_it(key):
    if key in OWNED_ELSEWHERE and not _supported(key):
        pytest.skip(f"{key} needs {OWNED_ELSEWHERE[key]}")
    value = TAO_KEYS[key]
    outcomes = {}
    for action in _readers(key):
        try:
            resolution = resolve_spec(action, overrides={**BASE[action], key: value})
        except SpecError as error:
            outcomes[action] = error
            continue
        assert key not in resolution.unused
        return
    # every reader asks for it: a required key at TAO's "not set" default ('???' or '')
    assert value in ("???", ""), outcomes
    assert all(_not_set_error(key, e) for e in outcomes.values()), outcomes


def _spec_text(name: str, data: Path, results_dir: Path) -> str:
    return (TAO_SPECS / name).read_text().replace("DATA_ROOT", str(data)).replace("RESULTS_ROOT", str(results_dir))


def _write_spec(name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    path.write_text(_spec_text(name, tmp_path / "data", tmp_path / "results"))
    return path


SERVES = {"spec.yaml": ["train", "evaluate", "inference", "export"],
          "spec_coco.yaml": ["train", "evaluate", "inference"],
          "infer.yaml": ["evaluate", "inference"],
          "gen_trt_engine.yaml": ["gen_trt_engine"]}


def _flat(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def _needs_elsewhere(name: str, action: str) -> List[str]:
    """What ``action`` reads in ``name`` that lands with other work: ADE keys or values, EfficientViT keys."""
    read = {k: v for k, v in _flat(yaml.safe_load((TAO_SPECS / name).read_text())).items() if action in _readers(k)}
    needs = [OWNED_ELSEWHERE[k] for k in read if k in OWNED_ELSEWHERE and k not in OUR_KEYS]
    if "ade" in read.values() and "ade" not in OUR_KEYS["dataset.train.type"]["enum"]:
        needs.append(OWNED_ELSEWHERE["dataset.train.type"])
    return sorted(set(needs))


@pytest.mark.parametrize("name,action", [(n, a) for n, actions in SERVES.items() for a in actions])
def test_taos_shipped_spec_files_load_for_every_action_they_serve(tmp_path, name, action):
    pending = _needs_elsewhere(name, action)
    if pending:
        pytest.skip(f"{name} for {action} needs {' and '.join(pending)}")
    resolution = resolve_spec(action, spec_path=_write_spec(name, tmp_path))
    own = set(ACTION_SECTIONS[action]) | set(COMMON_KEYS)
    assert all(key.split(".", 1)[0] not in own for key in resolution.unused)
    assert resolution.unused or action == "gen_trt_engine"  # the other actions' sections are reported, not refused


def test_gen_trt_engine_yaml_as_shipped_asks_for_the_onnx_file_it_leaves_at_question_marks(tmp_path):
    shipped = (TAO_SPECS / "gen_trt_engine.yaml").read_text().replace("RESULTS_ROOT/export/model.onnx", "???")
    path = tmp_path / "gen_trt_engine.yaml"
    path.write_text(shipped)
    with pytest.raises(SpecError, match="gen_trt_engine.onnx_file is not set"):
        load_spec("gen_trt_engine", spec_path=path)
    config = load_spec("gen_trt_engine", spec_path=path, overrides=["gen_trt_engine.onnx_file=/m.onnx"])
    assert config.results_dir is None  # results_dir: ??? is not set, never a folder named '???'
    assert config.gen_trt_engine.tensorrt.data_type == "FP16"  # TAO's fp16, in its canonical spelling


def test_required_key_left_at_question_marks_is_an_error_naming_the_key():
    with pytest.raises(SpecError, match=r"'export.opset_version' is '\?\?\?'.*give it a value"):
        load_spec("export", overrides={"export.checkpoint": "/m.pth", "export.opset_version": "???"})
    with pytest.raises(SpecError, match="export.checkpoint is not set"):
        load_spec("export", overrides={"export.checkpoint": "???"})


def test_enums_are_case_insensitive_and_resolve_to_the_canonical_spelling():
    config = load_spec("train", overrides={**BASE["train"], "train.precision": "FP16", "train.optim.lr_scheduler":
                                           "Warmuppoly", "train.distributed_strategy": "DDP",
                                           "model.mode": "Semantic", "train.optim.type": "adamw"})
    assert (config.train.precision, config.train.optim.lr_scheduler, config.train.distributed_strategy,
            config.model.mode, config.train.optim.type) == ("fp16", "WarmupPoly", "ddp", "semantic", "AdamW")
    with pytest.raises(SpecError, match="'train.precision': got 'fp64'"):
        load_spec("train", overrides={**BASE["train"], "train.precision": "fp64"})


def test_a_key_in_no_section_is_refused_with_the_nearest_keys_from_every_section(tmp_path):
    with pytest.raises(SpecError, match=r"Unknown key 'export.opset_versoin': no action reads it\. Did you mean "
                                        r"'export.opset_version'"):
        load_spec("train", overrides={**BASE["train"], "export.opset_versoin": 17})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"checkpont": "/m.pth"}}))
    with pytest.raises(SpecError, match="'evaluate.checkpont'.*'evaluate.checkpoint'"):
        load_spec("export", spec_path=path, overrides={"export.checkpoint": "/m.pth"})
    assert nearest_keys("train", "dataset.pixel_means")[0] == "dataset.pixel_mean"


def test_pixel_statistics_on_the_0_255_scale_are_refused_naming_the_key_and_the_scale():
    config = load_spec("train", overrides=BASE["train"])
    assert config.dataset.pixel_mean == [0.485, 0.456, 0.406] and config.dataset.pixel_std == [0.229, 0.224, 0.225]
    for key, value in (("dataset.pixel_mean", [123.675, 116.28, 103.53]),
                       ("dataset.pixel_std", [58.395, 57.12, 57.375])):
        with pytest.raises(SpecError, match=re.escape(key) + r" .* is above 1: it is on TAO's 0\.\.1 scale"):
            load_spec("evaluate", overrides={**BASE["evaluate"], key: value})


def test_a_swin_preset_named_in_the_spec_fixes_the_architecture_and_custom_keeps_explicit_values():
    tao_dump = {"export.checkpoint": "/m.pth", "model.backbone.swin.type": "large", "model.backbone.swin.embed_dim": 96,
                "model.backbone.swin.depths": [2, 2, 6, 2], "model.backbone.swin.num_heads": [3, 6, 12, 24]}
    resolution = resolve_spec("export", overrides=tao_dump)
    swin = resolution.config.model.backbone.swin
    assert (swin.embed_dim, swin.depths, swin.num_heads) == (192, [2, 2, 18, 2], [6, 12, 24, 48])
    assert any("model.backbone.swin.depths [2, 2, 6, 2] is replaced by the large preset's [2, 2, 18, 2]" in n
               for n in resolution.notes)
    swin = load_spec("export", overrides={**tao_dump, "model.backbone.swin.type": "custom"}).model.backbone.swin
    assert (swin.embed_dim, swin.depths, swin.num_heads) == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    with pytest.raises(SpecError, match="custom uses explicit values, but model.backbone.swin.depths is not set"):
        load_spec("export", overrides={"export.checkpoint": "/m.pth", "model.backbone.swin.type": "custom",
                                       "model.backbone.swin.embed_dim": 32,
                                       "model.backbone.swin.num_heads": [1, 2, 4, 8]})


def test_taos_batch_size_minus_one_takes_the_splits_batch_size():
    config = load_spec("evaluate", overrides={**BASE["evaluate"], "dataset.val.batch_size": 3})
    assert config.evaluate.batch_size == 3
    config = load_spec("inference", overrides={**BASE["inference"], "dataset.test.batch_size": 2,
                                               "inference.batch_size": -1})
    assert config.inference.batch_size == 2


def test_unimplemented_tao_values_are_refused_with_a_sentence():
    cases = [("quantize", "quantize.algorithm", "awq_lite", "is a TAO value that is not implemented here"),
             ("quantize", "quantize.device", "trt", "is a TAO value that is not implemented here"),
             ("train", "model.backbone.swin.out_indices", [1, 2, 3], "needs all four stages"),
             ("quantize", "quantize.backend_kwargs", {"x": 1}, "backend torchao takes its settings"),
             ("quantize", "quantize.device", "gpu", "cpu, cuda or cuda:N")]
    for action, key, value, fragment in cases:
        with pytest.raises(SpecError, match=re.escape(key) + ".*" + re.escape(fragment)):
            load_spec(action, overrides={**BASE[action], key: value})
    config = load_spec("quantize", overrides={**BASE["quantize"], "quantize.device": "cuda:1"})
    assert config.quantize.device == "cuda:1"


def test_swin_qk_scale_and_dropouts_act_as_in_tao():
    import torch

    from mask2former.model.builder import build_backbone

    def backbone(**extra):
        torch.manual_seed(0)
        return build_backbone(type=None, embed_dim=16, depths=[2, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4,
                              drop_path_rate=0.0, **extra)

    images = torch.randn(1, 3, 64, 64)
    plain = backbone().eval()
    dropping = backbone(drop_rate=0.5, attn_drop_rate=0.5)
    assert set(dropping.state_dict()) == set(plain.state_dict())  # no weights: checkpoints load either way
    with torch.no_grad():
        reference = plain(images)["res5"]
        assert torch.equal(dropping.eval()(images)["res5"], reference)  # dropout acts in training only
        assert not torch.allclose(dropping.train()(images)["res5"], reference)
        default_scale = backbone(qk_scale=None).eval()(images)["res5"]
        assert torch.equal(default_scale, reference)
        assert not torch.allclose(backbone(qk_scale=1.0).eval()(images)["res5"], reference)


def test_quantize_backend_kwargs_reach_modelopts_onnx_quantize_call(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mask2former.quantization.modelopt_onnx import quantize_onnx
    from mask2former.quantization.selection import ModuleChoice

    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="/model/fc/MatMul")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    calls = []

    class FakeModelOpt:
        @staticmethod
        def quantize(path, **kwargs):
            calls.append(kwargs)

    details = quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", chosen={"fc": ModuleChoice("int8", "int8")},
                            calibration=np.zeros((2, 4), np.float32), input_name="X", algorithm="minmax",
                            moq=FakeModelOpt, backend_kwargs={"calibration_eps": ["cuda:0"], "use_external_data": 1})
    assert calls[0]["calibration_eps"] == ["cuda:0"] and calls[0]["use_external_data"] == 1
    assert calls[0]["nodes_to_quantize"] == ["^/model/fc/MatMul$"] and details["backend_kwargs"]
    with pytest.raises(ValueError, match="output_path"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", chosen={"fc": ModuleChoice("int8", "int8")},
                      calibration=np.zeros((2, 4), np.float32), input_name="X", algorithm="minmax",
                      moq=FakeModelOpt, backend_kwargs={"output_path": "/elsewhere.onnx"})
    load_spec("quantize", overrides={**BASE["quantize"], "quantize.backend": "modelopt.onnx", "quantize.mode":
                                     "static_ptq", "dataset.quant_calibration_dataset.images_dir": "/c",
                                     "quantize.backend_kwargs": {"calibration_eps": ["cpu"]}})


def _evaluate_words(tmp_path: Path) -> List[str]:
    """An evaluate job that fails at once (its checkpoint does not exist) after writing experiment.yaml."""
    return [f"evaluate.checkpoint={tmp_path / 'missing.pth'}", f"dataset.val.img_dir={tmp_path}",
            f"dataset.val.panoptic_json={tmp_path / 'p.json'}", f"dataset.val.panoptic_dir={tmp_path}",
            f"dataset.label_map={tmp_path / 'l.json'}"]


def test_keys_of_other_actions_are_logged_in_one_line_and_recorded_in_experiment_yaml(tmp_path, caplog):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"),
                                    "train": {"num_epochs": 3, "optim": {"lr_scheduler": "Warmuppoly"}},
                                    "export": {"opset_version": 17}, "dataset": {"pin_memory": True},
                                    "model": {"export": False}}))
    with caplog.at_level("INFO", logger="mask2former"):
        main(["evaluate", "-e", str(spec), *_evaluate_words(tmp_path), "gen_trt_engine.tensorrt.data_type=fp16"])
    unused = [r.getMessage() for r in caplog.records if "not used by evaluate" in r.getMessage()]
    assert len(unused) == 1
    assert all(k in unused[0] for k in ("train.num_epochs", "train.optim.lr_scheduler", "export.opset_version",
                                        "gen_trt_engine.tensorrt.data_type"))
    notes = [r.getMessage() for r in caplog.records if "has no effect here" in r.getMessage()]
    assert any("dataset.pin_memory" in n for n in notes) and any("model.export" in n for n in notes)
    record = yaml.safe_load((tmp_path / "results" / "evaluate" / "experiment.yaml").read_text())
    assert record["not_used_by_this_action"] == {"train.num_epochs": 3, "train.optim.lr_scheduler": "Warmuppoly",
                                                 "export.opset_version": 17,
                                                 "gen_trt_engine.tensorrt.data_type": "fp16"}
    assert "train" not in record and record["evaluate"]["batch_size"] == 1
    # an experiment.yaml is itself a spec that every action takes
    assert load_spec("train", spec_path=tmp_path / "results" / "evaluate" / "experiment.yaml",
                     overrides=BASE["train"]).train.num_epochs == 3


def test_each_action_writes_to_its_own_folder_under_results_dir_or_its_own_results_dir(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "exp"),
                                    "inference": {"results_dir": str(tmp_path / "mine")}}))
    main(["evaluate", "-e", str(spec), *_evaluate_words(tmp_path)])
    main(["inference", "-e", str(spec), f"inference.checkpoint={tmp_path / 'missing.pth'}",
          f"dataset.test.img_dir={tmp_path}"])
    assert (tmp_path / "exp" / "evaluate" / "experiment.yaml").is_file()
    assert (tmp_path / "mine" / "experiment.yaml").is_file() and not (tmp_path / "exp" / "inference").exists()
    # --results-dir names the job folder exactly (the operators' job folders)
    main(["evaluate", "-e", str(spec), "--results-dir", str(tmp_path / "job"), *_evaluate_words(tmp_path)])
    assert (tmp_path / "job" / "experiment.yaml").is_file()


def test_a_folder_of_another_action_is_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "shared"
    main(["evaluate", "--results-dir", str(folder), *_evaluate_words(tmp_path)])
    before = (folder / "experiment.yaml").read_text()
    code = main(["inference", "--results-dir", str(folder), f"inference.checkpoint={tmp_path / 'missing.pth'}",
                 f"dataset.test.img_dir={tmp_path}"])
    assert code == 2 and "holds a job of evaluate" in capsys.readouterr().err
    assert (folder / "experiment.yaml").read_text() == before


TINY = ["model.backbone.pretrained_weights=null", "model.backbone.swin.type=custom", "model.backbone.swin.embed_dim=32",
        "model.backbone.swin.depths=[1,1,1,1]", "model.backbone.swin.num_heads=[1,2,4,8]",
        "model.backbone.swin.window_size=4", "model.backbone.swin.drop_path_rate=0.0",
        "model.sem_seg_head.num_classes=13", "model.sem_seg_head.convs_dim=32", "model.sem_seg_head.mask_dim=32",
        "model.sem_seg_head.transformer_enc_layers=1", "model.mask_former.num_object_queries=10",
        "model.mask_former.hidden_dim=32", "model.mask_former.nheads=4", "model.mask_former.dim_feedforward=64",
        "model.mask_former.dec_layers=3", "model.mask_former.train_num_points=256",
        "dataset.augmentation.train_min_size=[64]", "dataset.augmentation.train_max_size=128",
        "dataset.augmentation.train_crop_size=[64,64]", "dataset.augmentation.test_min_size=64",
        "dataset.augmentation.test_max_size=128", "dataset.train.num_workers=0", "dataset.val.num_workers=0"]


@pytest.mark.slow
def test_a_dry_run_then_train_then_evaluate_from_taos_coco_spec_leave_both_folders_intact(
        tmp_path, monkeypatch, caplog):
    from mask2former import results
    from mask2former.data.synthetic import generate

    generate(tmp_path / "data", dataset_format="coco_panoptic", num_images=2, size=64, seed=0, val_images=1)
    spec = _write_spec("spec_coco.yaml", tmp_path)
    # train.is_dry_run: one training and one validation batch check the spec and data, and write no model
    assert main(["train", "-e", str(spec), *TINY, "train.precision=fp32", "train.is_dry_run=true",
                 "--results-dir", str(tmp_path / "dry")]) == 0
    assert not list((tmp_path / "dry").glob("*.pth"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    with caplog.at_level("INFO", logger="mask2former"):
        assert main(["train", "-e", str(spec), *TINY, "train.num_epochs=1", "train.precision=fp32",
                     "wandb.enable=true", "train.clip_grad_type=norm", "train.clip_grad_norm_type=inf"]) == 0
    assert any("not used by train: inference.checkpoint, evaluate.checkpoint" in r.getMessage()
               for r in caplog.records)
    train_dir, evaluate_dir = tmp_path / "results" / "train", tmp_path / "results" / "evaluate"
    train_files = {p.name: p.read_bytes() for p in train_dir.iterdir() if p.is_file()}
    assert "metrics.json" in train_files and list(train_dir.glob("*.pth"))
    assert list((train_dir / "logs" / "wandb").rglob("offline-run-*"))  # W&B's offline run beside the other logs

    assert main(["evaluate", "-e", str(spec), *TINY, f"evaluate.checkpoint={train_dir}"]) == 0
    assert results.read_metrics(evaluate_dir)["num_images"] == 1
    assert {p.name: p.read_bytes() for p in train_dir.iterdir() if p.is_file()} == train_files
    assert yaml.safe_load((train_dir / "experiment.yaml").read_text())["train"]["num_epochs"] == 1
    assert "evaluate" in yaml.safe_load((evaluate_dir / "experiment.yaml").read_text())
