"""Hostile spec files and override values, through the CLI: refused with exit status 2 and one sentence
naming the file (or override), in bounded time, before anything is read or written (no job folder)."""

from __future__ import annotations

import pytest
import yaml

from hostile_support import assert_refused, record_accepted


def _laughs(levels: int = 12) -> str:
    """A 'billion laughs' spec: each anchor a list of nine aliases of the previous one (9^12 values)."""
    lines = ["dataset:", "  pixel_mean:", "  - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + ["train:", "  optim:", f"    milestones: *l{levels - 1}"]) + "\n"


SPECS = {
    "anchors and aliases: 'billion laughs' (9^12 values in 1 KB)": (
        _laughs(), r"expands to more than 10000 values through YAML anchors and aliases"),
    "a recursive alias": ("train: &a\n  optim: *a\n", r"holds a recursive YAML alias"),
    "lists nested 100000 deep": ("train: " + "[" * 100000 + "]" * 100000 + "\n", r"nests more than 32 levels deep"),
    "Latin-1 bytes (not UTF-8)": (b"train:\n  num_epochs: 3  # caf\xe9\n",
                                  r"is not UTF-8 text: byte 0xe9 at offset 29 is not valid UTF-8"),
    "UTF-16 without a byte-order mark": ("train:\n  num_epochs: 3\n".encode("utf-16-le"),
                                         r"is not UTF-8 text|is not valid YAML"),
    "a 2 MiB spec": ("train:\n  freeze: [" + ", ".join(["x" * 30] * 70000) + "]\n",
                     r"is \d+ bytes long; a spec is at most 1048576 bytes"),
    "a python/object tag": ("train: !!python/object/apply:os.system ['touch /tmp/m2f-pwned']\n",
                            r"is not valid YAML: could not determine a constructor for the tag"),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_a_hostile_spec_file_is_refused(sandbox, case):
    content, pattern = SPECS[case]
    path = sandbox.data / "spec.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    outcome = sandbox.run_cli("train", [], spec_path=path)
    assert_refused(outcome, f"^Spec file '{path}' ({pattern})", case=f"spec YAML: {case}", door="train CLI (-e)",
                   code=2, max_seconds=20)
    assert not sandbox.job.exists()


def test_a_billion_laughs_override_value_is_refused(sandbox):
    value = "[" + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9 if i else ["1"] * 9) + "]"
                            for i in range(12)) + "]"
    outcome = sandbox.run_cli("train", [f"train.optim.milestones={value}"], spec=sandbox.train_spec())
    assert_refused(outcome, r"^Override 'train.optim.milestones' expands to more than 10000 values",
                   case="spec YAML: 'billion laughs' in a command-line override", door="train CLI (key=value)",
                   code=2, max_seconds=20)


def test_a_utf8_spec_with_a_bom_and_small_aliases_is_accepted(sandbox):
    spec = sandbox.data / "spec.yaml"
    spec.write_bytes("\ufeffexport:\n  checkpoint: missing.pth\n  input_height: &side 64\n  input_width: *side\n"
                     "  # café\n".encode("utf-8"))
    outcome = sandbox.run_cli("export", [], spec_path=spec)
    assert outcome.code == 1 and "missing.pth" in outcome.message  # the spec was read; the checkpoint is absent
    experiment = yaml.safe_load((sandbox.job / "experiment.yaml").read_text())
    assert (experiment["export"]["input_height"], experiment["export"]["input_width"]) == (64, 64)
    record_accepted("spec YAML: UTF-8 with a byte-order mark, an anchor and an alias", "export CLI (-e)",
                    "read as written (experiment.yaml shows the aliased value)")
