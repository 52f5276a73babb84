"""The streaming evaluator: same numbers as the metrics package on the same predictions, every image
counted, results at the original size, raw outputs == runner outputs, fixed-size inputs keep the aspect
ratio, an oracle scores (almost) perfectly through the whole geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation_support import (CROPS, load_label_map, make_dataset, oracle_outputs, save_random_checkpoint,
                                small_data_overrides, split_overrides, tiny_model_overrides)
import mask2former.evaluation.predictions as predictions_module
from mask2former.config import load_spec
from mask2former.data.build import build_datasets
from mask2former.data.transforms import Sample
from mask2former.evaluation import HostStage, build_evaluator, evaluate_runner
from mask2former.evaluation.inputs import (FitTransform, GroundTruthImages, build_loader, collate_to_size,
                                           fit_size, input_transform)
from mask2former.metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
from mask2former.runtime import load_runner

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("model") / "model.pth", mode="panoptic")


def _config(data, checkpoint, mode="panoptic", **extra):
    overrides = {**tiny_model_overrides(mode), **small_data_overrides(), **split_overrides("val", data),
                 "evaluate.checkpoint": str(checkpoint), "model.object_mask_threshold": 0.05}
    overrides.update(extra)
    return load_spec("evaluate", overrides=overrides)


def _batches(config, dataset, *, batch_size, fixed_input_size=None):
    images = GroundTruthImages(dataset, transform=input_transform(dataset_cfg=config.dataset,
                                                                  fixed_input_size=fixed_input_size))
    return build_loader(images, batch_size=batch_size, num_workers=0,
                        size_divisibility=config.dataset.augmentation.size_divisibility,
                        fixed_input_size=fixed_input_size)


def _summary(metrics):
    return {k: v for k, v in metrics.items() if k != "per_class"}


def test_metrics_equal_the_metrics_package_on_the_same_predictions(data, checkpoint):
    config = _config(data, checkpoint)
    dataset = build_datasets(config, "val")
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    evaluator = build_evaluator(config, dataset)
    categories = dataset.label_map.categories()
    semantic = SemanticEvaluator.from_label_map(categories)
    panoptic = PanopticEvaluator(categories)
    instance_gt = dataset.coco_instance_ground_truth()
    instance = InstanceEvaluator(instance_gt)
    thing_ids = {c["id"] for c in instance_gt["categories"]}
    segments_seen = 0
    for batch in _batches(config, dataset, batch_size=2):
        for prediction, gt in zip(evaluator.process(runner(batch["images"]), batch["metas"]), batch["ground_truths"]):
            semantic.update(pred=prediction.sem_seg, gt=gt.sem_seg)
            panoptic.update(pred_seg=prediction.panoptic_seg, pred_segments=prediction.segments_info,
                            gt_seg=gt.panoptic_seg, gt_segments=gt.segments_info)
            instance.update(prediction.image_id, [d for d in prediction.instances if d["category_id"] in thing_ids])
            segments_seen += len(prediction.segments_info)
    assert segments_seen > 0, "the random model should predict some panoptic segments at this threshold"
    metrics = evaluator.compute()
    expected = {**semantic.compute(), **panoptic.compute(), **instance.compute()}
    for key in ("mIoU", "fwIoU", "pixel_accuracy", "mean_accuracy", "PQ", "SQ", "RQ", "PQ_th", "PQ_st", "AP", "AP50"):
        np.testing.assert_equal(metrics[key], expected[key], err_msg=key)
    assert metrics["num_images"] == NUM_IMAGES
    assert set(metrics["per_class"]) == {"semantic", "panoptic", "instance"}


def test_every_image_is_counted_when_the_batch_size_does_not_divide_the_dataset(data, checkpoint):
    config = _config(data, checkpoint, mode="semantic")
    dataset = build_datasets(config, "val")
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    evaluator = build_evaluator(config, dataset)
    metrics = evaluate_runner(runner=runner, dataset=dataset, evaluator=evaluator, dataset_cfg=config.dataset,
                              batch_size=2, num_workers=0)
    assert metrics["num_images"] == NUM_IMAGES
    labelled = sum(int((dataset.load_ground_truth(i).sem_seg != 255).sum()) for i in dataset.image_ids())
    assert evaluator.semantic.confusion_matrix[:-1].sum() == labelled  # every labelled pixel of every image
    assert set(metrics["per_class"]) == {"semantic"}  # semantic mode: no PQ, no AP
    assert "PQ" not in metrics and "AP" not in metrics


def test_predictions_are_at_the_original_size_of_each_image(data, checkpoint):
    config = _config(data, checkpoint)
    dataset = build_datasets(config, "val")
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    evaluator = build_evaluator(config, dataset)
    sizes = {}
    for batch in _batches(config, dataset, batch_size=3):
        for prediction in evaluator.process(runner(batch["images"]), batch["metas"]):
            sizes[prediction.file_name] = prediction.sem_seg.shape
            assert prediction.panoptic_seg.shape == prediction.sem_seg.shape
            assert all(d["segmentation"]["size"] == list(prediction.sem_seg.shape) for d in prediction.instances)
    assert sorted(sizes.values()) == sorted(CROPS[:NUM_IMAGES])


def test_raw_training_outputs_and_runner_outputs_give_identical_metrics(data, checkpoint):
    config = _config(data, checkpoint)
    dataset = build_datasets(config, "val")
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    network = runner.model.model
    from_raw, from_runner = build_evaluator(config, dataset), build_evaluator(config, dataset)
    for batch in _batches(config, dataset, batch_size=2):
        with torch.no_grad():
            from_raw.process(network(batch["images"]), batch["metas"])  # GT loaded by the evaluator
        from_runner.process(runner(batch["images"]), batch["metas"], batch["ground_truths"])
    a, b = from_raw.compute(), from_runner.compute()
    np.testing.assert_equal(_summary(a), _summary(b))
    from_raw.reset()
    assert from_raw.num_images == 0 and from_raw.semantic.confusion_matrix.sum() == 0


@pytest.mark.parametrize("fixed_input_size", [None, (64, 128)])
def test_an_oracle_scores_almost_perfectly_through_resize_padding_and_original_size(data, checkpoint,
                                                                                   fixed_input_size):
    config = _config(data, checkpoint, **{"model.object_mask_threshold": 0.4})
    dataset = build_datasets(config, "val")
    evaluator = build_evaluator(config, dataset)
    label_map = load_label_map(data)
    for batch in _batches(config, dataset, batch_size=2, fixed_input_size=fixed_input_size):
        if fixed_input_size:
            assert tuple(batch["images"].shape[-2:]) == fixed_input_size
        evaluator.process(oracle_outputs(batch["metas"], batch["ground_truths"], label_map), batch["metas"],
                          batch["ground_truths"])
    metrics = evaluator.compute()
    assert metrics["mIoU"] > 90 and metrics["pixel_accuracy"] > 97, _summary(metrics)
    assert metrics["PQ"] > 85 and metrics["RQ"] == 100 and metrics["AP50"] > 95, _summary(metrics)


def test_a_misplaced_prediction_scores_poorly(data, checkpoint):
    """The oracle check above can fail: the same outputs shifted by a quarter of the image score low."""
    config = _config(data, checkpoint)
    dataset = build_datasets(config, "val")
    evaluator = build_evaluator(config, dataset)
    label_map = load_label_map(data)
    for batch in _batches(config, dataset, batch_size=1):
        outputs = oracle_outputs(batch["metas"], batch["ground_truths"], label_map)
        shift = outputs["sem_scores"].shape[-1] // 3
        outputs = {k: torch.roll(v, shifts=shift, dims=-1) if v.dim() == 4 else v for k, v in outputs.items()}
        evaluator.process(outputs, batch["metas"], batch["ground_truths"])
    metrics = evaluator.compute()
    assert metrics["PQ"] < 40 and metrics["mIoU"] < 50, _summary(metrics)


def test_fixed_size_inputs_keep_the_aspect_ratio_and_are_padded_to_exactly_that_size(data, checkpoint):
    assert fit_size(96, 72, box=(64, 128)) == (64, 48)
    assert fit_size(64, 96, box=(64, 128)) == (64, 96)
    assert fit_size(50, 200, box=(64, 128)) == (32, 128)
    transform = FitTransform(box=(64, 128), pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1])
    sample = transform(Sample(image=np.full((96, 72, 3), 7, dtype=np.uint8)))
    assert sample.size == (64, 48)
    item = {"image": torch.from_numpy(sample.image), "image_id": 1, "file_name": "a.jpg", "orig_size": (96, 72),
            "image_size": sample.size}
    batch = collate_to_size([item], size=(64, 128))
    assert batch["images"].shape == (1, 3, 64, 128)
    assert batch["metas"][0]["padded_size"] == (64, 128) and batch["metas"][0]["image_size"] == (64, 48)
    assert float(batch["images"][0, :, :, 48:].abs().sum()) == 0.0  # padding right of the image
    with pytest.raises(ValueError, match="does not fit"):
        collate_to_size([item], size=(32, 128))


def test_chunked_upsampling_gives_the_same_predictions(data, checkpoint, monkeypatch):
    config = _config(data, checkpoint)
    dataset = build_datasets(config, "val")
    runner = load_runner("checkpoint", checkpoint, config, "cpu")
    batch = next(iter(_batches(config, dataset, batch_size=2)))
    outputs = runner(batch["images"])
    host = HostStage.from_config(config.model, dataset.label_map)
    whole = host(outputs, batch["metas"])
    monkeypatch.setattr(predictions_module, "CHUNK_ELEMENTS", 96 * 96)  # one channel at a time
    chunked = host(outputs, batch["metas"])
    for a, b in zip(whole, chunked):
        assert np.array_equal(a.sem_seg, b.sem_seg)
        assert [d["segmentation"] for d in a.instances] == [d["segmentation"] for d in b.instances]


def test_outputs_of_another_mode_are_refused_with_the_missing_names(data, checkpoint):
    config = _config(data, checkpoint)
    host = HostStage.from_config(config.model, load_label_map(data))
    metas = [{"image_id": 1, "file_name": "a.jpg", "orig_size": (8, 8), "image_size": (8, 8),
              "padded_size": (8, 8)}]
    with pytest.raises(ValueError, match=r"missing \['pan_scores'"):
        host({"sem_scores": torch.zeros(1, 13, 2, 2)}, metas)
    with pytest.raises(ValueError, match="predicts 4 classes"):
        HostStage.from_config(load_spec("evaluate", overrides={
            **tiny_model_overrides("semantic"), **split_overrides("val", data), "evaluate.checkpoint": "x"}).model,
            load_label_map(data))({"sem_scores": torch.zeros(1, 4, 2, 2)}, metas)
