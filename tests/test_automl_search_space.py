"""The search space from the train schema: bounds, multiples, powers, enums with weights, log scale,
cross-key rules, per-run additions/removals/custom ranges, and every sampled spec validating (property tests)."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mask2former.automl import policy
from mask2former.automl.search_space import SearchSpace, SearchSpaceError, build_search_space, flatten
from mask2former.config import load_spec, resolve_spec_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)

SCHEMA = policy.read_train_schema()
SKILL_INFO = policy.read_skill_info()


def _base_tree(**overrides):
    return resolve_spec_dict("train", overrides=overrides)


BASE_VALUES = flatten(_base_tree())
DATA = {"dataset.train.img_dir": "/data/train/images.tar.gz",
        "dataset.train.panoptic_json": "/data/train/annotations_panoptic.json",
        "dataset.train.panoptic_dir": "/data/train/images_panoptic.tar.gz",
        "dataset.label_map": "/data/train/label_map_panoptic.json"}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def samples(space: SearchSpace, *, seed: int, n: int, base=None):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append(space.sample(trial, base or BASE_VALUES))
        study.tell(trial, 0.0)
    return drawn, study


def space_with(**kwargs):
    return build_search_space(SCHEMA, SKILL_INFO, **kwargs)


def test_default_space_is_skill_info_defaults_minus_disabled():
    space = space_with()
    expected = [e["parameter"] for e in SKILL_INFO["automl_default_parameters"]
                if e["parameter"] not in SKILL_INFO["automl_disabled_parameters"]]
    assert sorted(space.keys) == sorted(expected)
    by_key = {p.key: p for p in space.parameters}
    assert by_key["train.optim.lr"].log and by_key["train.optim.weight_decay"].log
    assert not by_key["train.optim.momentum"].log
    hidden = by_key["model.mask_former.hidden_dim"]
    assert (hidden.low, hidden.high, hidden.multiple_of) == (64, 1024, 8)
    assert by_key["dataset.augmentation.test_min_size"].multiple_of == 32
    assert SearchSpace.from_dict(space.to_dict()) == space


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_every_sample_of_the_default_space_validates_and_honours_its_domain(seed):
    space = space_with()
    drawn, _ = samples(space, seed=seed, n=4)
    by_key = {p.key: p for p in space.parameters}
    for overrides in drawn:
        load_spec("train", overrides={**DATA, **overrides})
        for key, value in overrides.items():
            parameter = by_key[key]
            assert parameter.low <= value <= parameter.high
            if parameter.kind == "int":
                assert isinstance(value, int) and value % parameter.multiple_of == 0


@FAST
@given(seed=st.integers(0, 2**31 - 1), low=st.integers(1, 400), width=st.integers(0, 600), multiple=st.integers(2, 48))
def test_multiples_stay_in_range(seed, low, width, multiple):
    high = min(1000, low + width)
    ranges = {"model.mask_former.num_object_queries": {"valid_min": low, "valid_max": high,
                                                       "math_cond": f"/ {multiple}"}}
    if math.floor(high / multiple) * multiple < low:
        with pytest.raises(SearchSpaceError, match="num_object_queries: no value in"):
            space_with(custom_ranges=ranges)
        return
    space = space_with(custom_ranges=ranges)
    for overrides in samples(space, seed=seed, n=5)[0]:
        value = overrides["model.mask_former.num_object_queries"]
        assert low <= value <= high and value % multiple == 0


@FAST
@given(seed=st.integers(0, 2**31 - 1), low=st.integers(1, 300), width=st.integers(0, 700))
def test_powers_of_two(seed, low, width):
    high = min(1000, low + width)
    ranges = {"model.mask_former.num_object_queries": {"valid_min": low, "valid_max": high, "math_cond": "^ 2"}}
    if not any(low <= 2 ** e <= high for e in range(11)):
        with pytest.raises(SearchSpaceError):
            space_with(custom_ranges=ranges)
        return
    space = space_with(custom_ranges=ranges)
    for overrides in samples(space, seed=seed, n=5)[0]:
        value = overrides["model.mask_former.num_object_queries"]
        assert low <= value <= high and value & (value - 1) == 0


@FAST
@given(seed=st.integers(0, 2**31 - 1), low_exp=st.floats(-6, -2.5), span=st.floats(0.1, 2.0), log=st.booleans())
def test_float_ranges_log_or_linear(seed, low_exp, span, log):
    low, high = 10 ** low_exp, 10 ** (low_exp + span)
    space = space_with(custom_ranges={"train.optim.lr": {"valid_min": low, "valid_max": high, "log_scale": log}})
    drawn, study = samples(space, seed=seed, n=5)
    for overrides in drawn:
        assert low <= overrides["train.optim.lr"] <= high
    assert study.trials[0].distributions["train.optim.lr"].log is log


def test_log_scale_spreads_samples_evenly_over_decades():
    space = space_with()  # lr in [1e-6, 1e-2], log scale
    drawn, _ = samples(space, seed=0, n=400)
    below = sum(1 for o in drawn if o["train.optim.lr"] < 1e-4) / len(drawn)
    assert 0.4 < below < 0.6  # uniform in log space; a linear scale would put ~1% below 1e-4


def test_enum_option_weights_are_honoured():
    space = space_with(add=["model.backbone.swin.type"])
    drawn, _ = samples(space, seed=1, n=2000)
    counts = Counter(o["model.backbone.swin.type"] for o in drawn)
    for name, weight in zip(["tiny", "small", "base", "large"], [0.4, 0.3, 0.2, 0.1]):
        assert abs(counts[name] / 2000 - weight) < 0.04, counts


@FAST
@given(seed=st.integers(0, 2**31 - 1),
       options=st.lists(st.sampled_from(["tiny", "small", "base", "large"]), min_size=1, max_size=4, unique=True))
def test_enum_custom_options(seed, options):
    space = space_with(custom_ranges={"model.backbone.swin.type": {"valid_options": options}})
    for overrides in samples(space, seed=seed, n=5)[0]:
        assert overrides["model.backbone.swin.type"] in options


def test_booleans_and_enums_can_be_added():
    space = space_with(add=["train.optim.lr_scheduler", "model.mask_former.deep_supervision"])
    drawn, _ = samples(space, seed=4, n=40)
    assert {o["train.optim.lr_scheduler"] for o in drawn} == {"MultiStep", "WarmupPoly"}
    assert {o["model.mask_former.deep_supervision"] for o in drawn} == {True, False}



def test_backbone_family_and_variant_can_be_searched():
    space = space_with(add=["model.backbone.type", "model.backbone.efficientvit.name"])
    drawn, _ = samples(space, seed=5, n=40)
    assert {o["model.backbone.type"] for o in drawn} == {"swin", "efficientvit"}
    assert {o["model.backbone.efficientvit.name"] for o in drawn} >= {"b0", "b2", "l1", "l2"}
    for overrides in drawn[:5]:
        config = load_spec("train", overrides={**DATA, **overrides})
        assert config.model.backbone.type == overrides["model.backbone.type"]
@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_hidden_dim_is_a_multiple_of_the_sampled_nheads(seed):
    """Cross-key rules: nheads is sampled first; hidden_dim is drawn among multiples of lcm(8, nheads) and
    convs_dim (which the deformable encoder splits over the same heads) among multiples of lcm(32, nheads)."""
    space = space_with(custom_ranges={"model.mask_former.nheads": {"valid_min": 1, "valid_max": 12},
                                      "model.mask_former.hidden_dim": {"valid_min": 8, "valid_max": 96},
                                      "model.sem_seg_head.convs_dim": {"valid_min": 32, "valid_max": 384}},
                       base_values=BASE_VALUES)
    order = space.keys
    assert order.index("model.mask_former.nheads") < order.index("model.mask_former.hidden_dim")
    assert order.index("model.mask_former.nheads") < order.index("model.sem_seg_head.convs_dim")
    for overrides in samples(space, seed=seed, n=5)[0]:
        hidden, heads = overrides["model.mask_former.hidden_dim"], overrides["model.mask_former.nheads"]
        convs = overrides["model.sem_seg_head.convs_dim"]
        assert hidden % heads == 0 and hidden % 8 == 0 and 8 <= hidden <= 96
        assert convs % heads == 0 and convs % 32 == 0 and 32 <= convs <= 384
        load_spec("train", overrides={**DATA, **overrides})


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_swin_embed_dim_divides_into_every_stage(seed):
    """Cross-key rule: embed_dim * 2^i divisible by num_heads[i] (tiny preset heads 3, 6, 12, 24)."""
    space = space_with(custom_ranges={"model.backbone.swin.embed_dim": {"valid_min": 16, "valid_max": 200}},
                       base_values=BASE_VALUES)
    for overrides in samples(space, seed=seed, n=5)[0]:
        assert overrides["model.backbone.swin.embed_dim"] % 3 == 0
        load_spec("train", overrides={**DATA, **overrides})


def test_infeasible_cross_key_range_is_refused_before_any_trial():
    base = flatten(_base_tree(**{"model.mask_former.nheads": 7}))
    with pytest.raises(SearchSpaceError, match=r"hidden_dim: no value in \[64, 100\].*nheads"):
        space_with(custom_ranges={"model.mask_former.hidden_dim": {"valid_min": 64, "valid_max": 100}},
                   base_values=base)


@pytest.mark.parametrize("fixed", ["hidden_dim", "convs_dim"])
def test_searched_heads_that_would_not_divide_a_fixed_width_are_refused_before_any_trial(fixed):
    searched = {"model.mask_former.nheads": {"valid_min": 1, "valid_max": 8}}
    removed = []
    if fixed == "convs_dim":  # hidden_dim is searched by default, so only convs_dim (256) stays fixed
        searched["model.mask_former.hidden_dim"] = {"valid_min": 8, "valid_max": 96}
    else:
        searched["model.sem_seg_head.convs_dim"] = {"valid_min": 32, "valid_max": 384}
        removed.append("model.mask_former.hidden_dim")
    with pytest.raises(SearchSpaceError, match=rf"model.mask_former.nheads: the draw model.mask_former.nheads=3 "
                                               rf"breaks the rule that .*{fixed} \(= 256, not searched\)"):
        space_with(custom_ranges=searched, remove=removed, base_values=BASE_VALUES)
    # powers of two divide 256: the same search is accepted
    searched["model.mask_former.nheads"]["math_cond"] = "^ 2"
    space_with(custom_ranges=searched, remove=removed, base_values=BASE_VALUES)


def test_removals_and_additions():
    space = space_with(remove=["train.optim.momentum"], add=["model.mask_former.dropout"])
    assert "train.optim.momentum" not in space.keys
    dropout = {p.key: p for p in space.parameters}["model.mask_former.dropout"]
    assert (dropout.kind, dropout.low, dropout.high) == ("float", 0.0, 1.0)  # the schema's bounds


@pytest.mark.parametrize("kwargs, message", [
    ({"add": ["train.optim.lrr"]}, "not a key of the train schema. Did you mean 'train.optim.lr'"),
    ({"add": ["train.num_epochs"]}, "AutoML never varies it"),
    ({"remove": ["train.optim.gamma"]}, "is not in the default search space"),
    ({"remove": ["train.optim.lr"], "add": ["train.optim.lr"]}, "both removed and added"),
    ({"add": ["dataset.augmentation.train_crop_size"]}, "cannot be searched"),
    ({"add": ["model.mask_former.nheads"]}, "gives no upper bound"),
    ({"custom_ranges": {"train.optim.lr": {"valid_min": 0.5, "valid_max": 2.0}}}, "above the schema maximum 1"),
    ({"custom_ranges": {"train.optim.lr": {"valid_min": 0, "valid_max": 0.1}}}, "must be above 0"),
    ({"custom_ranges": {"train.optim.momentum": {"valid_min": 0.9, "valid_max": 0.8}}}, "above valid_max"),
    ({"custom_ranges": {"train.optim.lr": {"low": 1e-4}}}, "unknown field"),
    ({"custom_ranges": {"model.mask_former.hidden_dim": {"math_cond": "> 4"}}}, "math_cond '> 4' is not supported"),
    ({"custom_ranges": {"model.backbone.swin.type": {"valid_options": ["huge"]}}}, "non-empty subset"),
    ({"custom_ranges": {"model.backbone.swin.type": {"valid_options": ["tiny"], "option_weights": [1, 2]}}},
     "one non-negative weight per option"),
    ({"custom_ranges": {"model.mask_former.dec_layers": {"valid_min": 1, "valid_max": 5, "log_scale": True,
                                                         "math_cond": "/ 2"}}}, "log_scale cannot be combined"),
])
def test_refused_requests_name_the_key_and_the_reason(kwargs, message):
    with pytest.raises(SearchSpaceError, match=message.replace("(", r"\(").replace("[", r"\[")):
        space_with(**kwargs)


def test_an_empty_space_is_refused():
    every = [e["parameter"] for e in SKILL_INFO["automl_default_parameters"]]
    with pytest.raises(SearchSpaceError, match="the search space is empty"):
        space_with(remove=every)
