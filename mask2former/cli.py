"""``python -m mask2former ACTION -e SPEC [key=value ...]`` and the maintenance subcommands.

Exit status: 0 success, 1 the action failed (status.json ends with FAILURE), 2 the spec or the
command line is invalid (nothing was read or written beyond the message).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import yaml

from . import results
from .actions import available_actions, module_name
from .actions.job import ActionError, ActionResult, Job
from .config import ACTIONS, UNUSED_RECORD_KEY, SpecError, resolve_spec, spec_to_dict, unused_line
from .config.experiment import ACTION_DESCRIPTIONS
from .crypto import key_from_environment
from .errors import InputFileError
from .host_allocator import configure_host_allocator

REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_FAILED = 1
EXIT_USAGE = 2


def _action_parser(sub: argparse._SubParsersAction, action: str) -> None:
    p = sub.add_parser(action, help=ACTION_DESCRIPTIONS[action], description=ACTION_DESCRIPTIONS[action]
                       + " Keys and defaults: specs/spec_template_" + action + ".yaml.")
    p.add_argument("-e", "--experiment-spec", dest="spec", help="YAML spec file (sections as in the template).")
    p.add_argument("--results-dir", help="Results folder of this job (default: results_dir from the spec, else "
                                         "a new folder under ./results).")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Dotted overrides, YAML-typed values "
                                                                     "(train.num_epochs=10 model.mode=semantic).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mask2former",
                                     description="Mask2Former engine: run an action on a spec.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for action in available_actions():
        _action_parser(sub, action)
    schemas = sub.add_parser("schemas", help="Generate schemas/ and specs/ from the config dataclasses.")
    schemas.add_argument("--check", action="store_true", help="Fail (exit 1) when a generated file is stale.")
    schemas.add_argument("--root", default=str(REPO_ROOT), help="Repository root to write into.")
    if importlib.util.find_spec("mask2former.model.weights") is not None:
        imp = sub.add_parser("import-weights", help="Convert Hugging Face, detectron2, official Swin, EfficientViT or "
                                                    "TAO weights into a checkpoint of this tool.")
        imp.add_argument("--format", required=True, choices=["hf", "detectron2", "swin", "tao", "efficientvit"])
        imp.add_argument("source")
        imp.add_argument("output")
        imp.add_argument("-e", "--experiment-spec", dest="spec", help="Spec whose model section describes the "
                                                                      "architecture.")
        imp.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _configure_logging() -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return logging.getLogger("mask2former")


class Terminated(BaseException):
    """SIGTERM (an orchestrator killing the task) turned into an exception, so status.json gets FAILURE."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(f"received signal {signal.Signals(signum).name}")


def is_primary_process() -> bool:
    """False in the extra processes of a job started once per rank or per node (torchrun, multi-node):
    only the primary one writes the job's experiment.yaml, status.json and metrics.json."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "NODE_RANK", "LOCAL_RANK"))


def job_folder(action: str, config, results_dir: Optional[str]) -> Path:
    """The job's folder, as TAO's update_results_dir: ``--results-dir`` (the operators' job folder) exactly, else
    ``<action>.results_dir``, else ``<results_dir>/<action>``, else a new folder under ./results."""
    if results_dir:
        return Path(results_dir)
    own = getattr(getattr(config, action), "results_dir", None)
    if own:
        return Path(own)
    if config.results_dir:
        return Path(config.results_dir) / action
    return results.new_results_dir(Path.cwd() / "results", action)


def results_owner(folder: Path) -> Optional[str]:
    """The action whose job wrote ``folder``'s status.json (its first line reads '<action> started'), or None."""
    try:
        lines = results.read_status(folder)
    except OSError:
        return None
    message = str(lines[0].get("message", "")) if lines else ""
    action = message.split(" ", 1)[0]
    return action if message.endswith(" started") and action in ACTIONS else None


def run_action(action: str, spec: Optional[str], overrides: List[str], results_dir: Optional[str]) -> int:
    log = _configure_logging()
    primary = is_primary_process()
    try:
        resolution = resolve_spec(action, spec_path=spec, overrides=overrides)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = resolution.config
    line = unused_line(action, resolution.unused)
    if line:
        log.info(line)
    for note in resolution.notes:
        log.info("%s", note)
    # a key in the environment keeps it off command lines, spec files and process listings
    config.encryption_key = config.encryption_key or key_from_environment()
    folder = job_folder(action, config, results_dir)
    other = results_owner(folder)
    if other not in (None, action):
        print(f"error: the results folder {folder} holds a job of {other}; {action} would overwrite its "
              f"experiment.yaml, status.json and metrics.json. Give {action} its own folder ({action}.results_dir, "
              "or results_dir, under which each action writes to <results_dir>/<action>).", file=sys.stderr)
        return EXIT_USAGE
    config.results_dir = str(folder.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    if primary:
        record = spec_to_dict(action, config)
        if resolution.unused:
            record[UNUSED_RECORD_KEY] = resolution.unused
        results.atomic_write_text(folder / results.EXPERIMENT_FILE, yaml.safe_dump(record, sort_keys=False))
    status = results.StatusWriter(folder, enabled=primary)
    status.started(f"{action} started")
    signal.signal(signal.SIGTERM, _raise_terminated)
    configure_host_allocator()
    job = Job(action=action, results_dir=folder.resolve(), status=status, log=log)
    try:
        module = importlib.import_module(module_name(action))
        outcome: ActionResult = module.run(config, job)
    except (ActionError, InputFileError) as exc:
        status.failure(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        status.failure(f"{action} interrupted")
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end status.json with FAILURE
        status.failure(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return EXIT_FAILED
    if outcome.metrics and primary:
        results.write_metrics(folder, outcome.metrics)
    status.success(outcome.message, kpi=outcome.kpi)
    print(f"{action} finished: {folder.resolve()}")
    return 0


def run_schemas(root: str, check: bool) -> int:
    from .config import generate

    root_path = Path(root)
    if check:
        stale = generate.stale_files(root_path)
        if stale:
            print("Stale generated files (run `python -m mask2former schemas`): " + ", ".join(stale), file=sys.stderr)
            return EXIT_FAILED
        print("schemas and spec templates are up to date")
        return 0
    written = generate.write_all(root_path)
    print("wrote " + (", ".join(written) if written else "nothing (all up to date)"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ACTIONS and argv[0] not in available_actions():
        print(f"error: action {argv[0]} is not available in this build of the engine.", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "schemas":
        return run_schemas(args.root, args.check)
    if args.command == "import-weights":
        from .model.weights import cli_import_weights

        try:
            return cli_import_weights(args)
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return run_action(args.command, args.spec, args.overrides, args.results_dir)
