"""Entry point of the extra local ranks of a multi-process training run (started by
:class:`mask2former.training.distributed.LocalWorkers`, never by users)::

    python -m mask2former.training.worker --spec RESOLVED_SPEC.yaml --results-dir DIR

The spec is the one the train action resolved (remote files already fetched, the resume checkpoint fixed),
so every rank trains the same model from the same state, in the same data order (the resume checkpoint's
epoch and step are read as the train action reads them). Rank > 0 writes no status line and no file.
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
from .session import ResumePoint, build_training_datasets, read_resume_point, run_training


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mask2former.training.worker", description=__doc__)
    parser.add_argument("--spec", required=True, help="Resolved train spec written by the train action.")
    parser.add_argument("--results-dir", required=True, help="Results folder of the job.")
    args = parser.parse_args(argv)
    rank = os.environ.get("LOCAL_RANK", "?")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    log = logging.getLogger("mask2former.train")
    config = load_spec("train", spec_path=args.spec)
    configure_host_allocator()
    plan = plan_devices(config.train, cuda_devices=torch.cuda.device_count(), env=os.environ)
    results_dir = Path(args.results_dir)
    run_training(config, plan=plan, datasets=build_training_datasets(config), results_dir=results_dir,
                 status=StatusWriter(results_dir), log=log, resume=resume_point(config))
    return 0


def resume_point(config: Any) -> Optional[ResumePoint]:
    """The resume checkpoint the train action fixed in the spec, with the epoch and step it records."""
    path = config.train.resume_training_checkpoint_path
    if not path:
        return None
    return read_resume_point(Path(path), config.encryption_key)


if __name__ == "__main__":
    sys.exit(main())
