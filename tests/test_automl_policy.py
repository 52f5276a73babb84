"""The AutoML policy: the model's automl_policy, the per-run override, other actions, missing generated files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mask2former.automl import policy

REPO = Path(__file__).resolve().parents[1]


def generated_root(tmp_path: Path, *, policy_value: str = "auto", drop=()) -> Path:
    """A copy of the generated files with ``automl_policy`` set and some files left out."""
    root = tmp_path / "root"
    for rel in (policy.TRAIN_SCHEMA_FILE, policy.TRAIN_TEMPLATE_FILE, policy.SKILL_INFO_FILE):
        if rel in drop:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    info = root / policy.SKILL_INFO_FILE
    if info.is_file():
        info.write_text(info.read_text().replace("automl_policy: auto", f"automl_policy: {policy_value}"))
    return root


def test_the_repository_policy_is_auto_and_runnable():
    decision = policy.decide("train")
    assert (decision.policy, decision.source, decision.use_automl, decision.runnable) == \
        ("auto", "skill_info", True, True)


def test_model_policy_off_trains_directly(tmp_path):
    decision = policy.decide("train", root=generated_root(tmp_path, policy_value="off"))
    assert (decision.policy, decision.source, decision.use_automl) == ("off", "skill_info", False)
    assert decision.reason == "AutoML is off (specs/skill_info.yaml): training directly."


def test_per_run_override_wins_and_never_changes_the_metadata_file(tmp_path):
    root = generated_root(tmp_path, policy_value="off")
    before = (root / policy.SKILL_INFO_FILE).read_bytes()
    on = policy.decide("train", override="auto", root=root)
    assert (on.policy, on.source, on.use_automl) == ("auto", "run", True)
    off = policy.decide("train", override="OFF", root=generated_root(tmp_path / "b"))
    assert (off.policy, off.source, off.use_automl) == ("off", "run", False)
    assert (root / policy.SKILL_INFO_FILE).read_bytes() == before
    assert policy.decide("train", override="", root=root).source == "skill_info"


@pytest.mark.parametrize("action", ["evaluate", "inference", "export", "quantize", "gen_trt_engine"])
def test_other_actions_never_go_through_automl(action):
    decision = policy.decide(action, override="auto")
    assert decision.use_automl is False and f"{action} never goes through AutoML" in decision.reason


@pytest.mark.parametrize("missing", [policy.TRAIN_SCHEMA_FILE, policy.TRAIN_TEMPLATE_FILE])
def test_missing_schema_or_template_trains_directly_and_says_why(tmp_path, missing):
    decision = policy.decide("train", root=generated_root(tmp_path, drop=[missing]))
    assert (decision.policy, decision.use_automl, decision.runnable) == ("auto", False, False)
    assert "AutoML is enabled (policy auto) but not runnable until the schemas are generated" in decision.reason
    assert "`python -m mask2former schemas`" in decision.reason and missing in decision.reason


def test_without_skill_info_the_default_policy_applies(tmp_path):
    decision = policy.decide("train", root=generated_root(tmp_path, drop=[policy.SKILL_INFO_FILE]))
    assert (decision.policy, decision.source, decision.use_automl) == ("auto", "default", False)
    assert policy.SKILL_INFO_FILE in decision.reason


def test_a_disabled_model_never_searches(tmp_path):
    root = generated_root(tmp_path)
    info = root / policy.SKILL_INFO_FILE
    info.write_text(info.read_text().replace("automl_enabled: true", "automl_enabled: false"))
    decision = policy.decide("train", override="auto", root=root)
    assert decision.use_automl is False and "automl_enabled false" in decision.reason


def test_bad_policy_values_are_refused(tmp_path):
    with pytest.raises(policy.AutoMLConfigError, match="per-run override: automl_policy 'sometimes' is not one of "
                                                       "auto, off"):
        policy.decide("train", override="sometimes")
    root = generated_root(tmp_path, policy_value="maybe")
    with pytest.raises(policy.AutoMLConfigError, match="skill_info.yaml: automl_policy 'maybe'"):
        policy.decide("train", root=root)
