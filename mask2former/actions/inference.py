"""inference: segment the images of dataset.test.img_dir (a folder or an archive; jpg/jpeg/png in any
letter case) with a checkpoint, ONNX model, TensorRT engine or quantized model.

Outputs in the results folder (see mask2former.evaluation.writers): semantic/ PNGs of raw category ids
(every mode), panoptic/ PNGs + panoptic.json (panoptic mode), instances.json in the COCO results format
(instance and panoptic mode) and overlays/ (inference.save_overlays). Image ids come from
dataset.test.panoptic_json or dataset.test.instance_json when one is set (matched by file name), so
``evaluate.predictions`` can score the outputs against those annotations; otherwise an image's id is its
position in the sorted folder listing. With dataset.test.target_size every image is stretched to it first, as in
TAO, and the outputs are at that size.

An encrypted model is opened with ``encryption_key`` (a missing or wrong key stops the job before the
images are read); running out of memory or disk ends with FAILURE naming the keys that help.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..data.build import build_inference_dataset
from ..evaluation.inputs import build_loader, input_transform
from ..evaluation.models import job_label_map, load_job_runner
from ..evaluation.pipeline import run_batch
from ..evaluation.predictions import HostStage
from ..evaluation.progress import ProgressReporter
from ..evaluation.writers import PredictionWriter
from .job import ActionError, ActionResult, Job
from .resource_failures import reports_resource_failures


def annotated_image_ids(split: Any) -> Optional[Dict[str, int]]:
    """file_name -> image id from dataset.test.panoptic_json or instance_json (its ``images``), or None."""
    for key in ("panoptic_json", "instance_json"):
        value = getattr(split, key)
        if not value:
            continue
        path = Path(value)
        try:
            images = json.loads(path.read_text())["images"]
            return {str(image["file_name"]): int(image["id"]) for image in images}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ActionError(f"dataset.test.{key}={value!r}: cannot read its 'images' list of {{id, file_name}} "
                              f"({exc})") from exc
    return None


@reports_resource_failures("inference")
def run(config: Any, job: Job) -> ActionResult:
    section = config.inference
    runner, kind, path = load_job_runner(config, action="inference")
    label_map = job_label_map(config, kind=kind, path=path, num_classes=runner.num_classes)
    try:
        dataset = build_inference_dataset(config)
    except (OSError, ValueError) as exc:
        raise ActionError(str(exc)) from exc
    dataset.transform = input_transform(dataset_cfg=config.dataset, fixed_input_size=runner.fixed_input_size)
    ids = annotated_image_ids(config.dataset.test)
    if ids is not None:
        unknown = [p.relative_to(dataset.folder).as_posix() for p in dataset.paths
                   if p.relative_to(dataset.folder).as_posix() not in ids]
        if unknown:
            raise ActionError(f"{len(unknown)} image(s) of dataset.test.img_dir are not listed in the test "
                              f"annotation file's images, e.g. {unknown[:3]}")
    host = HostStage.from_config(config.model, label_map)
    writer = PredictionWriter(out_dir=job.results_dir, label_map=label_map, save_overlays=section.save_overlays)
    loader = build_loader(dataset, batch_size=section.batch_size, num_workers=config.dataset.test.num_workers,
                          size_divisibility=config.dataset.augmentation.size_divisibility,
                          fixed_input_size=runner.fixed_input_size)
    progress = ProgressReporter(action="inference", status=job.status, log=job.log)
    job.log.info("inference: %d images of %s, %s model %s, mode %s", len(dataset), config.dataset.test.img_dir,
                 kind, path, config.model.mode)
    done = 0
    try:
        for batch in loader:
            metas = batch["metas"]
            if ids is not None:
                metas = [dict(meta, image_id=ids[meta["file_name"]]) for meta in metas]
            outputs = run_batch(runner, batch["images"], runner.max_batch_size)
            for prediction in host(outputs, metas):
                image = dataset.load_image(dataset.folder / prediction.file_name) if section.save_overlays else None
                writer.write(prediction, image=image)
            done += len(metas)
            progress(done, len(dataset))
    except BaseException:
        writer.abort()
        raise
    artifacts = writer.close()
    return ActionResult(message=f"inference of {kind} {path.name} on {done} images",
                        metrics={"num_images": done, "mode": config.model.mode},
                        artifacts={name: str(p) for name, p in artifacts.items()})
