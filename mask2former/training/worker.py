"""Entry point of the extra local ranks of a multi-process training run (started by
:class:`mask2former.training.distributed.LocalWorkers`, never by users)::

    python -m mask2former.training.worker --spec RESOLVED_SPEC.yaml --results-dir DIR [--resume-epoch E --resume-step S]

The spec is the one the train action resolved (remote files already fetched, the resume checkpoint fixed),
so every rank trains the same model from the same state, in the same data order (the resume checkpoint's
epoch and step come from the train action, which read them). Rank > 0 writes no status line and no file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import torch

from ..config import load_spec
from ..host_allocator import configure_host_allocator
from ..results import StatusWriter
from .distributed import plan_devices
from .session import ResumePoint, build_training_datasets, run_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mask2former.training.worker", description=__doc__)
    parser.add_argument("--spec", required=True, help="Resolved train spec written by the train action.")
    parser.add_argument("--results-dir", required=True, help="Results folder of the job.")
    parser.add_argument("--resume-epoch", type=int, help="Epoch of the resume checkpoint, as the action read it.")
    parser.add_argument("--resume-step", type=int, help="Global step of the resume checkpoint.")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("LOCAL_RANK", "?")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    log = logging.getLogger("mask2former.train")
    config = load_spec("train", spec_path=args.spec)
    configure_host_allocator()
    plan = plan_devices(config.train, cuda_devices=torch.cuda.device_count(), env=os.environ)
    results_dir = Path(args.results_dir)
    run_training(config, plan=plan, datasets=build_training_datasets(config), results_dir=results_dir,
                 status=StatusWriter(results_dir), log=log, resume=resume_point(config, args))
    return 0


def worker_arguments(resume: Optional[ResumePoint]) -> List[str]:
    """The worker command's arguments for ``resume``: the position the train action already read from the
    checkpoint, so that no rank reads the whole checkpoint once more only to learn it."""
    if resume is None:
        return []
    return ["--resume-epoch", str(resume.epoch), "--resume-step", str(resume.global_step)]


def resume_point(config: Any, args: argparse.Namespace) -> Optional[ResumePoint]:
    """The resume checkpoint the train action fixed in the spec, at the position it passed."""
    path = config.train.resume_training_checkpoint_path
    if not path:
        return None
    return ResumePoint(checkpoint=Path(path), epoch=args.resume_epoch, global_step=args.resume_step)


if __name__ == "__main__":
    sys.exit(main())
