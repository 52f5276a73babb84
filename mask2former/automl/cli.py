"""``python -m mask2former.automl COMMAND``: run a search without Airflow, run one worker, show the space.

* ``search -e SPEC [key=value ...] --results-dir D [options]``: honours the AutoML policy (off, or
  schemas not generated: trains directly with ``python -m mask2former train`` and says why); else
  plans the search in D, runs ``--workers`` local worker processes and chooses the best trial.
* ``worker --search-dir D --slot N``: one worker's quota of trials (what each mapped Airflow task does).
* ``space [--add KEY] [--remove KEY] [--range KEY=JSON]``: print the search space.

Exit status: 0 done, 1 the search failed (no trial completed), 2 invalid spec or AutoML settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mask2former.config import SpecError, parse_override_words
from mask2former.config.loader import read_spec_file

from . import policy
from .study import ALGORITHMS

EXIT_FAILED = 1
EXIT_USAGE = 2


def _parse_ranges(words: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    ranges: Dict[str, Dict[str, Any]] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep:
            raise policy.AutoMLConfigError(f"--range {word!r} must read KEY=JSON, e.g. "
                                           "train.optim.lr='{\"valid_min\": 1e-5, \"valid_max\": 1e-3}'.")
        try:
            ranges[key.strip()] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise policy.AutoMLConfigError(f"--range {key}: {raw!r} is not JSON ({exc.msg}).") from None
    return ranges


def _space_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--add", action="append", default=[], metavar="KEY", help="Search this train key too.")
    parser.add_argument("--remove", action="append", default=[], metavar="KEY", help="Leave this default key out.")
    parser.add_argument("--range", action="append", default=[], metavar="KEY=JSON",
                        help='Custom range, e.g. model.mask_former.hidden_dim=\'{"valid_min": 64, "valid_max": 256}\'.')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mask2former.automl", description="Mask2Former AutoML.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    search = sub.add_parser("search", help="Hyper-parameter search over train (or plain training when off).")
    search.add_argument("-e", "--experiment-spec", dest="spec", help="Train spec YAML (the base of every trial).")
    search.add_argument("--results-dir", required=True, help="The search folder.")
    search.add_argument("--policy", choices=policy.POLICIES, help="Override automl_policy for this run.")
    search.add_argument("--algorithm", choices=ALGORITHMS, default="bayesian")
    search.add_argument("--max-recommendations", type=int, default=8, help="Number of trials.")
    search.add_argument("--max-epochs", type=int, default=10, help="Epochs per trial.")
    search.add_argument("--reduction-factor", type=int, default=3, help="Hyperband reduction factor.")
    search.add_argument("--workers", type=int, default=1, help="Trials run in parallel.")
    search.add_argument("--seed", type=int, default=1234)
    search.add_argument("--storage", help="Study storage URL (default: SQLite in the search folder); a password "
                                          "may come from MASK2FORMER_AUTOML_STORAGE instead.")
    search.add_argument("--cleanup-non-best", action="store_true", help="Delete the checkpoints of other trials.")
    _space_arguments(search)
    search.add_argument("overrides", nargs="*", metavar="key=value")
    worker = sub.add_parser("worker", help="Run one worker's quota of trials of a planned search.")
    worker.add_argument("--search-dir", required=True)
    worker.add_argument("--slot", type=int, required=True)
    space = sub.add_parser("space", help="Print the search space.")
    space.add_argument("--root", help="Folder holding schemas/ and specs/ (default: this repository).")
    _space_arguments(space)
    return parser


def _log() -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    return logging.getLogger("mask2former.automl")


def run_search(args: argparse.Namespace) -> int:
    from mask2former import cli as engine_cli

    from .search import SearchError, SearchSettings, STORAGE_ENV, finish_search, plan_search, run_local_search

    log = _log().info
    decision = policy.decide("train", override=args.policy)
    log(decision.reason)
    if not decision.use_automl:
        words = (["-e", args.spec] if args.spec else []) + ["--results-dir", args.results_dir] + list(args.overrides)
        return engine_cli.main(["train"] + words)
    settings = SearchSettings(algorithm=args.algorithm, max_recommendations=args.max_recommendations,
                              max_epochs=args.max_epochs, reduction_factor=args.reduction_factor, seed=args.seed,
                              workers=args.workers, add_parameters=args.add, remove_parameters=args.remove,
                              custom_ranges=_parse_ranges(args.range))
    storage = args.storage or os.environ.get(STORAGE_ENV)
    plan = plan_search(search_dir=Path(args.results_dir), settings=settings,
                       base_spec=read_spec_file(args.spec) if args.spec else None,
                       overrides=parse_override_words(args.overrides), storage_url=storage, log=log)
    codes = run_local_search(plan, storage_url=storage, log=log)
    if any(codes):
        log(f"worker exit codes {codes}; see worker_*.log in {plan.search_dir}")
    try:
        outcome = finish_search(plan, storage_url=storage, cleanup_non_best=args.cleanup_non_best, log=log)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"best trial {outcome.best['number']}: mIoU {outcome.best['value']:.4f} in {outcome.best['results_dir']}")
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    from .search import STORAGE_ENV, SearchPlan, run_worker
    from .trial import TrialRunner

    log = _log().info
    plan = SearchPlan.read(Path(args.search_dir))
    runner = TrialRunner(log=log)
    signal.signal(signal.SIGTERM, lambda signum, frame: runner.kill())
    outcomes = run_worker(plan, args.slot, storage_url=os.environ.get(STORAGE_ENV), runner=runner, log=log)
    log(f"slot {args.slot}: {len(outcomes)} trial(s) run")
    return EXIT_FAILED if runner.killed else 0


def run_space(args: argparse.Namespace) -> int:
    from .search_space import build_search_space

    schema, info = policy.read_train_schema(args.root), policy.read_skill_info(args.root)
    if schema is None or info is None:
        print(f"error: {policy.TRAIN_SCHEMA_FILE} or {policy.SKILL_INFO_FILE} is missing; run "
              f"`{policy.GENERATE_COMMAND}`.", file=sys.stderr)
        return EXIT_USAGE
    space = build_search_space(schema, info, add=args.add, remove=args.remove, custom_ranges=_parse_ranges(args.range))
    print("\n".join(space.describe()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"search": run_search, "worker": run_worker_command, "space": run_space}
    try:
        return handlers[args.command](args)
    except (SpecError, policy.AutoMLConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
