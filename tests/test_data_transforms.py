"""Augmentation invariants: targets stay aligned with the image through every geometric step."""

import numpy as np
import pytest

from mask2former.data.transforms import (
    EvalTransform, Normalize, Sample, TrainTransform, category_capped_crop_box, color_jitter, hflip, resize,
    resized_crop, shortest_edge_size)

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
RED, GRAY = np.array([230, 20, 20]), np.array([100, 100, 100])


def _square_sample(height=120, width=200, box=(30, 110, 70, 170)):
    """Gray image with a red square; mask, sem_seg (class 3 on the square, 1 elsewhere)."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GRAY
    top, left, bottom, right = box
    image[top:bottom, left:right] = RED
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    sem_seg = np.where(mask, 3, 1).astype(np.int32)
    return Sample(image=image, masks=mask[None], labels=np.array([3]), sem_seg=sem_seg,
                  ignore_mask=np.zeros((height, width), dtype=bool))


def _train(**overrides):
    kwargs = dict(train_min_size=[64, 96, 128], train_max_size=400, train_crop_size=[80, 100], hflip_prob=0.5,
                  color_jitter=False, crop_single_category_max_area=1.0, large_scale_jitter=False,
                  lsj_scale_range=[0.1, 2.0], pixel_mean=MEAN, pixel_std=STD)
    kwargs.update(overrides)
    return TrainTransform(**kwargs)


def _denormalise(image):
    """float32 [3, H, W] normalised -> [H, W, 3] on the 0..255 scale."""
    return (image.transpose(1, 2, 0) * np.array(STD, dtype=np.float32) + np.array(MEAN, dtype=np.float32)) * 255.0


def _erode(mask):
    """3x3 erosion (border pixels count as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            inner &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return inner


def _assert_aligned(sample):
    """Red exactly where the mask is (1-px border tolerance for bilinear), gray elsewhere."""
    image = _denormalise(sample.image)
    valid = ~sample.ignore_mask
    if len(sample.masks):
        mask = sample.masks[0]
        np.testing.assert_array_equal(sample.sem_seg[mask], 3)
        inside = _erode(mask)
        assert np.abs(image[inside] - RED).max() < 2.0
        outside = _erode(~mask) & valid
        assert np.abs(image[outside] - GRAY).max() < 2.0
    else:  # the square was cropped away: nothing red in the valid area
        assert (np.abs(image[valid] - GRAY).max(axis=-1) < 2.0).mean() > 0.97


@pytest.mark.parametrize("seed", range(12))
def test_default_augmentation_keeps_masks_on_the_square(seed):
    out = _train()(_square_sample(), np.random.default_rng(seed))
    assert out.image.dtype == np.float32
    assert out.size[0] <= 80 and out.size[1] <= 100
    assert out.masks.shape[1:] == out.size == out.sem_seg.shape == out.ignore_mask.shape
    _assert_aligned(out)


@pytest.mark.parametrize("seed", range(12))
def test_large_scale_jitter_output_size_and_padding(seed):
    out = _train(large_scale_jitter=True, lsj_scale_range=[0.3, 2.0])(_square_sample(), np.random.default_rng(seed))
    assert out.size == (80, 100)
    _assert_aligned(out)
    padded = out.ignore_mask
    assert (out.sem_seg[padded] == 255).all() and not out.masks[:, padded].any()
    assert (out.image[:, padded] == 0).all()  # zero after normalisation


def test_lsj_small_scale_pads_most_of_the_crop():
    out = _train(large_scale_jitter=True, lsj_scale_range=[0.25, 0.25])(_square_sample(), np.random.default_rng(0))
    # 120x200 scaled by min(0.25*80/120, 0.25*100/200) = 0.125 -> 15x25 content in an 80x100 canvas
    assert out.size == (80, 100)
    assert (~out.ignore_mask).sum() == 15 * 25
    assert out.ignore_mask[15:].all() and out.ignore_mask[:, 25:].all()


def test_flip_mirrors_image_and_targets():
    sample = _square_sample()
    flipped = hflip(sample)
    np.testing.assert_array_equal(flipped.masks[0], sample.masks[0][:, ::-1])
    np.testing.assert_array_equal(flipped.image, sample.image[:, ::-1])
    always = _train(hflip_prob=1.0, train_min_size=[120], train_crop_size=[120, 200])
    never = _train(hflip_prob=0.0, train_min_size=[120], train_crop_size=[120, 200])
    a, b = always(sample, np.random.default_rng(1)), never(sample, np.random.default_rng(1))
    np.testing.assert_array_equal(a.masks[0], b.masks[0][:, ::-1])


def test_resize_nearest_targets_share_the_image_grid():
    sample = _square_sample()
    small = resize(sample, 60, 100)
    assert small.masks[0].sum() == 20 * 30  # exact halving of a square on even coordinates
    assert small.masks[0][15:35, 55:85].all()
    _assert_aligned(Normalize(pixel_mean=MEAN, pixel_std=STD)(small))


@pytest.mark.parametrize("size, box", [((300, 500), (40, 75, 80, 100)), ((60, 100), (5, 0, 50, 90)),
                                       ((120, 200), (10, 20, 64, 64)), ((37, 61), (0, 0, 37, 61))])
def test_resized_crop_equals_resize_then_crop(size, box):
    rng = np.random.default_rng(0)
    sample = _square_sample()
    sample.image = rng.integers(0, 256, sample.image.shape, dtype=np.uint8)  # texture everywhere
    top, left, h, w = box
    full = resize(sample, *size)
    fused = resized_crop(sample, size=size, box=box)
    np.testing.assert_array_equal(fused.masks, full.masks[:, top:top + h, left:left + w])
    np.testing.assert_array_equal(fused.sem_seg, full.sem_seg[top:top + h, left:left + w])
    difference = np.abs(fused.image.astype(int) - full.image[top:top + h, left:left + w])
    assert difference.max() <= 1


def test_shortest_edge_size():
    assert shortest_edge_size(480, 640, short=320, max_size=1000) == (320, 427)
    assert shortest_edge_size(100, 1000, short=200, max_size=1000) == (100, 1000)  # capped by the long edge
    assert shortest_edge_size(640, 480, short=640, max_size=640) == (640, 480)


def test_eval_transform_keeps_aspect_ratio_and_is_deterministic():
    transform = EvalTransform(test_min_size=60, test_max_size=1000, pixel_mean=MEAN, pixel_std=STD)
    out = transform(_square_sample())
    assert out.size == (60, 100)
    _assert_aligned(out)
    np.testing.assert_array_equal(transform(_square_sample()).image, out.image)


def test_train_min_size_choice_and_max_size_cap():
    sizes = {_train(train_crop_size=[999, 999])(_square_sample(), np.random.default_rng(s)).size
             for s in range(30)}
    assert sizes == {(64, 107), (96, 160), (128, 213)}
    capped = _train(train_min_size=[128], train_max_size=150, train_crop_size=[999, 999])
    assert capped(_square_sample(), np.random.default_rng(0)).size == (90, 150)


class _CountingRng:
    def __init__(self, seed):
        self.rng, self.draws = np.random.default_rng(seed), 0

    def integers(self, *args):
        self.draws += 1
        return self.rng.integers(*args)


def test_category_cap_retries_ten_times_then_keeps_the_last_crop():
    uniform = np.ones((50, 50), dtype=np.int32)  # one class everywhere: no crop can satisfy the cap
    rng = _CountingRng(0)
    box = category_capped_crop_box((50, 50), uniform, crop_size=(20, 20), max_area=0.5, rng=rng)
    assert rng.draws == 2 * 10 and box[2:] == (20, 20)
    rng = _CountingRng(0)
    category_capped_crop_box((50, 50), uniform, crop_size=(20, 20), max_area=1.0, rng=rng)
    assert rng.draws == 2  # no cap: one draw


def test_category_cap_prefers_mixed_crops():
    sem_seg = np.zeros((100, 100), dtype=np.int32)
    sem_seg[:40, :40] = 1  # class 1 only in the top-left corner
    sem_seg[95:, :] = 255  # ignored rows do not count

    def share_ok(max_area, seed):
        top, left, h, w = category_capped_crop_box((100, 100), sem_seg, crop_size=(40, 40), max_area=max_area,
                                                   rng=np.random.default_rng(seed))
        window = sem_seg[top:top + h, left:left + w]
        counts = np.bincount(window[window != 255].ravel(), minlength=2)
        return counts.max() < 0.9 * counts.sum()

    capped = np.mean([share_ok(0.9, s) for s in range(200)])
    free = np.mean([share_ok(1.0, s) for s in range(200)])
    assert capped > 0.6 and free < 0.35 and capped > 2 * free


def test_color_jitter_changes_pixels_not_geometry():
    image = _square_sample().image
    outs = [color_jitter(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(np.abs(o.astype(int) - image).max() > 5 for o in outs)
    transform = _train(color_jitter=True, train_min_size=[120], train_crop_size=[120, 200], hflip_prob=0.0)
    out = transform(_square_sample(), np.random.default_rng(3))
    np.testing.assert_array_equal(out.masks[0], _square_sample().masks[0])


def test_masks_cropped_away_are_dropped():
    sample = _square_sample(box=(0, 0, 10, 10))
    transform = _train(train_min_size=[120], train_crop_size=[60, 60], hflip_prob=0.0)
    for seed in range(20):
        out = transform(sample, np.random.default_rng(seed))
        assert len(out.masks) == len(out.labels)
        assert all(m.any() for m in out.masks)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(train_min_size=[]), "train_min_size"),
    (dict(train_crop_size=[10]), "train_crop_size"),
    (dict(lsj_scale_range=[2.0, 1.0]), "lsj_scale_range"),
    (dict(pixel_std=[1.0, 0.0, 1.0]), "pixel_std"),
    (dict(pixel_mean=[123.675, 116.28, 103.53]), "0..1 scale"),
])
def test_invalid_settings_name_the_key(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        _train(**kwargs)


def test_tao_scale_statistics_give_the_inputs_of_the_former_0_255_statistics():
    """image / 255 normalised with ImageNet's 0..1 statistics is, to the bit, (image - 255 m) / (255 s) as the
    0..255 statistics computed it, so imported models and earlier metrics are unchanged."""
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = Normalize(pixel_mean=MEAN, pixel_std=STD)(Sample(image=image)).image
    former_mean = np.asarray([123.675, 116.28, 103.53], dtype=np.float32)[:, None, None]
    former_inv_std = (1.0 / np.asarray([58.395, 57.12, 57.375], dtype=np.float32))[:, None, None]
    former = (image.transpose(2, 0, 1).astype(np.float32) - former_mean) * former_inv_std
    np.testing.assert_array_equal(out, former)
    tao = ((image.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out, tao, atol=1e-5)
