"""Spec resolution: defaults, YAML, dotted overrides, validation and the cross-key rules."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mask2former.config import ACTIONS, SpecError, load_spec, parse_override_words, resolve_spec_dict
from mask2former.config.schema import action_schema, iter_leaves

ROOT = Path(__file__).resolve().parents[1]

PANOPTIC_DATA = {
    "dataset.train.img_dir": "s3://b/train/images.tar.gz",
    "dataset.train.panoptic_json": "s3://b/train/annotations_panoptic.json",
    "dataset.train.panoptic_dir": "s3://b/train/images_panoptic.tar.gz",
    "dataset.label_map": "s3://b/train/label_map_panoptic.json",
}


def test_defaults_carry_the_tao_values_users_know():
    cfg = load_spec("train", overrides=PANOPTIC_DATA)
    assert cfg.model.mode == "panoptic"
    assert cfg.model.object_mask_threshold == 0.4 and cfg.model.overlap_threshold == 0.5
    assert cfg.model.mask_former.num_object_queries == 100 and cfg.model.mask_former.dec_layers == 10
    assert cfg.model.mask_former.train_num_points == 12544
    assert cfg.model.sem_seg_head.num_classes == 200
    assert cfg.train.optim.lr == 2e-4 and cfg.train.optim.milestones == [88, 96]
    assert cfg.export.opset_version == 17 and cfg.export.batch_size == -1
    assert cfg.gen_trt_engine.tensorrt.workspace_size == 1024


@pytest.mark.parametrize("preset,embed,depths,heads", [
    ("tiny", 96, [2, 2, 6, 2], [3, 6, 12, 24]),
    ("small", 96, [2, 2, 18, 2], [3, 6, 12, 24]),
    ("base", 128, [2, 2, 18, 2], [4, 8, 16, 32]),
    ("large", 192, [2, 2, 18, 2], [6, 12, 24, 48]),
])
def test_swin_presets_fill_the_architecture(preset, embed, depths, heads):
    cfg = load_spec("export", overrides={"export.checkpoint": "m.pth", "model.backbone.swin.type": preset})
    swin = cfg.model.backbone.swin
    assert (swin.embed_dim, swin.depths, swin.num_heads) == (embed, depths, heads)


def test_explicit_small_architecture_wins_over_the_preset():
    cfg = load_spec("export", overrides={"export.checkpoint": "m.pth", "model.backbone.swin.embed_dim": 32,
                                         "model.backbone.swin.depths": [1, 1, 1, 1],
                                         "model.backbone.swin.num_heads": [1, 2, 4, 8]})
    assert cfg.model.backbone.swin.embed_dim == 32 and cfg.model.backbone.swin.depths == [1, 1, 1, 1]


def test_yaml_file_then_overrides(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"train": {"num_epochs": 3, "optim": {"lr": 0.001}}, "model": {"mode": "semantic"}}))
    cfg = load_spec("train", spec_path=spec, overrides=["train.num_epochs=5", "dataset.train.img_dir=/d/img",
                                                        "dataset.train.instance_json=/d/a.json",
                                                        "dataset.label_map=/d/l.json"])
    assert cfg.train.num_epochs == 5 and cfg.train.optim.lr == 0.001 and cfg.model.mode == "semantic"


def test_command_line_values_are_yaml_typed_and_exponents_read_as_numbers():
    words = parse_override_words(["train.num_epochs=10", "train.optim.lr=1e-4", "train.freeze=[backbone]",
                                  "model.backbone.pretrained_weights="])
    assert words == {"train.num_epochs": 10, "train.optim.lr": "1e-4", "train.freeze": ["backbone"],
                     "model.backbone.pretrained_weights": None}
    cfg = load_spec("train", overrides={**PANOPTIC_DATA, **words})
    assert cfg.train.optim.lr == pytest.approx(1e-4) and isinstance(cfg.train.optim.lr, float)


BAD_OVERRIDES = [
    ({"train.num_epoch": 3}, "train.num_epoch", "train.num_epochs"),
    ({"train.optim.learning_rate": 0.1}, "train.optim.learning_rate", "train.optim.lr"),
    ({"modle.mode": "semantic"}, "modle.mode", "model.mode"),
    ({"train.num_epochs": 0}, "train.num_epochs", ">= 1"),
    ({"train.num_epochs": "ten"}, "train.num_epochs", "an integer"),
    ({"train.num_epochs": 2.5}, "train.num_epochs", "an integer"),
    ({"train.optim.lr": -0.1}, "train.optim.lr", "> 0"),
    ({"train.optim.lr": 5}, "train.optim.lr", "<= 1"),
    ({"model.mode": "panoptik"}, "model.mode", "'panoptic'"),
    ({"train.precision": "fp64"}, "train.precision", "'bf16'"),
    ({"model.backbone.swin.type": "huge"}, "model.backbone.swin.type", "'large'"),
    ({"dataset.augmentation.train_crop_size": [640]}, "dataset.augmentation.train_crop_size", "2 items"),
    ({"model.sem_seg_head.convs_dim": 100}, "model.sem_seg_head.convs_dim", "multiple of 32"),
    ({"train.use_amp": True}, "train.use_amp", "Unknown key"),
    ({"exprot.opset_version": 13}, "exprot.opset_version", "export.opset_version"),
]


@pytest.mark.parametrize("overrides,key,expected", BAD_OVERRIDES)
def test_bad_overrides_are_refused_naming_the_key(overrides, key, expected):
    with pytest.raises(SpecError) as err:
        load_spec("train", overrides={**PANOPTIC_DATA, **overrides})
    assert key in str(err.value) and expected in str(err.value)


def test_wrong_value_message_names_value_and_allowed():
    with pytest.raises(SpecError, match=r"'model.mode': got 'panoptik'; expected .*one of 'panoptic', 'instance', "
                                        r"'semantic'"):
        load_spec("train", overrides={**PANOPTIC_DATA, "model.mode": "panoptik"})


RULES = [
    ("gen_trt_engine", {"gen_trt_engine.onnx_file": "m.onnx", "gen_trt_engine.tensorrt.data_type": "INT8"},
     "FP32 and FP16 only"),
    ("gen_trt_engine", {"gen_trt_engine.onnx_file": "m.onnx", "gen_trt_engine.tensorrt.min_batch_size": 4,
                        "gen_trt_engine.tensorrt.opt_batch_size": 2, "gen_trt_engine.tensorrt.max_batch_size": 8},
     "min_batch_size <= opt_batch_size <= max_batch_size"),
    ("gen_trt_engine", {}, "gen_trt_engine.onnx_file is not set"),
    ("train", {**PANOPTIC_DATA, "train.distributed_strategy": "fsdp"}, "fsdp needs train.precision fp16 or bf16"),
    ("train", {"dataset.train.img_dir": "/x", "dataset.train.instance_json": "/a.json", "dataset.label_map": "/l"},
     "model.mode panoptic needs dataset.train.panoptic_json"),
    ("train", {"model.mode": "instance", "dataset.train.img_dir": "/x", "dataset.label_map": "/l"},
     "model.mode instance needs dataset.train.instance_json"),
    ("train", {}, "dataset.train.img_dir is not set"),
    ("train", {**PANOPTIC_DATA, "model.mask_former.hidden_dim": 36, "model.mask_former.nheads": 8},
     "multiple of model.mask_former.nheads"),
    ("evaluate", {"evaluate.checkpoint": "a.pth", "evaluate.onnx_file": "a.onnx"}, "set only one of"),
    ("export", {}, "export.checkpoint is not set"),
    ("quantize", {"quantize.model_path": "m.pth", "quantize.backend": "torchao", "quantize.mode": "static_ptq"},
     "torchao supports quantize.mode weight_only_ptq only"),
    ("inference", {"inference.checkpoint": "m.pth"}, "dataset.test.img_dir is not set"),
]


@pytest.mark.parametrize("action,overrides,expected", RULES)
def test_cross_key_rules(action, overrides, expected):
    with pytest.raises(SpecError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_spec(action, overrides=overrides)


def test_unknown_action_is_refused():
    with pytest.raises(SpecError, match="Unknown action 'trian'.*'train'"):
        load_spec("trian")


def test_spec_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("train", spec_path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SpecError, match="bad.yaml' is not valid YAML"):
        load_spec("train", spec_path=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec("train", spec_path=listy)


def test_section_override_with_a_mapping_merges():
    tree = resolve_spec_dict("train", overrides={"train.optim": {"lr": 0.01}})
    assert tree["train"]["optim"]["lr"] == 0.01 and tree["train"]["optim"]["gamma"] == 0.1


@pytest.mark.parametrize("action", ACTIONS)
def test_every_schema_validates_its_template(action):
    schema = json.loads((ROOT / "schemas" / f"{action}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    template = yaml.safe_load((ROOT / "specs" / f"spec_template_{action}.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(template)


@pytest.mark.parametrize("action", ACTIONS)
def test_every_leaf_has_description_default_and_automl_flag(action):
    for key, leaf in iter_leaves(action_schema(action)):
        assert leaf.get("description"), key
        assert "default" in leaf, key
        assert "automl_enabled" in leaf, key


def test_manifest_lists_the_six_actions():
    manifest = json.loads((ROOT / "schemas" / "manifest.json").read_text())
    assert sorted(manifest["actions"]) == sorted(ACTIONS)
    for action, entry in manifest["actions"].items():
        assert (ROOT / "schemas" / entry["schema"]).is_file()


def test_skill_info_search_space():
    info = yaml.safe_load((ROOT / "specs" / "skill_info.yaml").read_text())
    assert info["automl_enabled"] is True and info["automl_policy"] == "auto"
    assert info["monitoring_metric"] == "mIoU"
    params = {p["parameter"]: p for p in info["automl_default_parameters"]}
    for key in ("train.optim.lr", "train.optim.backbone_multiplier", "train.optim.momentum",
                "train.optim.weight_decay", "model.mask_former.num_object_queries", "model.mask_former.hidden_dim",
                "model.mask_former.dec_layers", "dataset.augmentation.train_max_size",
                "dataset.augmentation.test_min_size", "dataset.augmentation.test_max_size"):
        assert key in params, key
    assert params["train.optim.lr"]["log_scale"] and params["train.optim.weight_decay"]["log_scale"]
    assert params["model.mask_former.hidden_dim"]["math_cond"] == "/ 8"
    assert params["model.mask_former.hidden_dim"]["valid_min"] == 64
    assert params["model.mask_former.hidden_dim"]["valid_max"] == 1024
    assert "train.num_epochs" in info["automl_disabled_parameters"]
    assert not set(params) & set(info["automl_disabled_parameters"])
