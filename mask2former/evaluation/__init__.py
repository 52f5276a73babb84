"""Evaluation and inference plumbing shared by the evaluate and inference actions and by training
validation.

- ``pipeline``: the streaming :class:`Evaluator` (``build_evaluator(cfg, dataset)``, ``process``,
  ``compute``) and the loop over a runner (``evaluate_runner``);
- ``predictions``: the host stage, runner outputs -> :class:`ImagePrediction` at original size;
- ``inputs``: network inputs for any-size and fixed-size runners;
- ``writers`` / ``overlays``: prediction files (semantic, panoptic, COCO results) and overlay images;
- ``files``: scoring prediction files on disk; ``reports``: per-class tables, chart, kpi;
- ``models``: which model file a job runs and its label map; ``progress``: status lines and progress bar.
"""

from .pipeline import Evaluator, build_evaluator, evaluate_runner
from .predictions import HostStage, ImagePrediction

__all__ = ["Evaluator", "HostStage", "ImagePrediction", "build_evaluator", "evaluate_runner"]
