"""COCO instance and COCO panoptic readers on tiny hand-made files, folders and archives."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from mask2former.data.archives import UnsafeArchiveError
from mask2former.data.coco import CocoInstanceReader, segmentation_to_mask
from mask2former.data.coco_panoptic import CocoPanopticReader, id_to_rgb, rgb_to_id
from mask2former.data.label_map import LabelEntry, LabelMap
from mask2former.data.targets import build_ground_truth, build_targets

H, W = 20, 30
CATEGORIES = [{"id": 1, "name": "road", "isthing": 0}, {"id": 7, "name": "car", "isthing": 1},
              {"id": 9, "name": "person", "isthing": 1}]


def _label_map(*, contiguous_id=False, num_classes=10):
    entries = [LabelEntry(id=c["id"], name=c["name"], color=(0, 0, 0), isthing=bool(c["isthing"]))
               for c in CATEGORIES]
    return LabelMap(entries=entries, contiguous_id=contiguous_id, num_classes=num_classes)


def _image_bytes(fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (W, H), (90, 90, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def _box(top, left, bottom, right):
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _uncompressed_rle(mask):
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] + runs) if flat[0] else runs}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _coco_json(tmp_path, annotations, file_name="a.jpg"):
    data = {"images": [{"id": 5, "file_name": file_name, "height": H, "width": W}],
            "annotations": annotations, "categories": CATEGORIES}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _image_folder(tmp_path, names=("a.jpg",)):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(_image_bytes())
    return folder


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


POLYGON_BOX = _box(3, 2, 9, 12)  # polygon (2,3)-(12,9) rasterises to rows 3..8, cols 2..11
RLE_BOX = _box(10, 15, 18, 25)
CROWD_BOX = _box(0, 20, 6, 30)


def _three_annotations():
    return [
        {"id": 1, "image_id": 5, "category_id": 7, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},
        {"id": 2, "image_id": 5, "category_id": 9, "iscrowd": 0, "segmentation": _compressed_rle(RLE_BOX)},
        {"id": 3, "image_id": 5, "category_id": 9, "iscrowd": 1, "segmentation": _uncompressed_rle(CROWD_BOX)},
    ]


def test_polygon_compressed_and_uncompressed_rle_decode_exactly(tmp_path):
    reader = CocoInstanceReader(annotation_file=_coco_json(tmp_path, _three_annotations()),
                                img_dir=_image_folder(tmp_path))
    segments = reader.load_segments(5).segments
    np.testing.assert_array_equal(segments[0].mask, POLYGON_BOX)
    np.testing.assert_array_equal(segments[1].mask, RLE_BOX)
    np.testing.assert_array_equal(segments[2].mask, CROWD_BOX)
    assert [s.iscrowd for s in segments] == [False, False, True]
    assert [s.category_id for s in segments] == [7, 9, 9]


def test_crowd_and_unknown_category_become_ignore(tmp_path):
    annotations = _three_annotations() + [
        {"id": 4, "image_id": 5, "category_id": 4, "iscrowd": 0, "segmentation": [[0, 15, 6, 15, 6, 20, 0, 20]]}]
    reader = CocoInstanceReader(annotation_file=_coco_json(tmp_path, annotations), img_dir=_image_folder(tmp_path))
    targets = build_targets(reader.load_segments(5), label_map=_label_map(), mode="panoptic")
    assert targets.labels.tolist() == [7, 9]
    np.testing.assert_array_equal(targets.masks[0], POLYGON_BOX)
    unknown = segmentation_to_mask([[0, 15, 6, 15, 6, 20, 0, 20]], height=H, width=W, where="t")
    np.testing.assert_array_equal(targets.ignore_mask, CROWD_BOX | unknown)
    assert (targets.sem_seg[CROWD_BOX] == 255).all() and (targets.sem_seg[unknown] == 255).all()
    assert (targets.sem_seg[POLYGON_BOX] == 7).all() and (targets.sem_seg[RLE_BOX] == 9).all()
    background = ~(POLYGON_BOX | RLE_BOX | CROWD_BOX | unknown)
    assert (targets.sem_seg[background] == 255).all() and not targets.ignore_mask[background].any()


def test_instance_ground_truth_in_raw_ids(tmp_path):
    reader = CocoInstanceReader(annotation_file=_coco_json(tmp_path, _three_annotations()),
                                img_dir=_image_folder(tmp_path))
    label_map = _label_map(contiguous_id=True, num_classes=3)
    truth = build_ground_truth(reader.load_segments(5), label_map=label_map)
    assert (truth.sem_seg[POLYGON_BOX] == 7).all()  # raw ids, not the contiguous index 1
    assert (truth.sem_seg[CROWD_BOX] == 255).all()
    by_category = {(s["category_id"], s["iscrowd"]): s for s in truth.segments_info}
    assert by_category[(9, 1)]["area"] == CROWD_BOX.sum()
    crowd_id = by_category[(9, 1)]["id"]
    assert (truth.panoptic_seg[CROWD_BOX] == crowd_id).all()


def test_missing_image_names_annotation_file_and_image(tmp_path):
    annotation_file = _coco_json(tmp_path, [], file_name="gone.jpg")
    with pytest.raises(FileNotFoundError) as error:
        CocoInstanceReader(annotation_file=annotation_file, img_dir=_image_folder(tmp_path))
    assert str(annotation_file) in str(error.value) and "gone.jpg" in str(error.value)


def test_annotation_of_unknown_image_and_bad_polygon(tmp_path):
    stray = [{"id": 8, "image_id": 99, "category_id": 7, "segmentation": []}]
    with pytest.raises(ValueError, match="annotation 8 refers to image_id 99"):
        CocoInstanceReader(annotation_file=_coco_json(tmp_path, stray), img_dir=_image_folder(tmp_path))
    with pytest.raises(ValueError, match="x, y pairs"):
        segmentation_to_mask([[1, 2, 3]], height=H, width=W, where="t")
    with pytest.raises(ValueError, match="RLE size"):
        segmentation_to_mask({"size": [1, 1], "counts": [1]}, height=H, width=W, where="t")


@pytest.mark.parametrize("prefix", ["", "images/"])
def test_archive_with_files_at_root_or_in_one_top_folder(tmp_path, prefix):
    archive = _tar_gz(tmp_path / "images.tar.gz", [(prefix + "a.jpg", _image_bytes())])
    reader = CocoInstanceReader(annotation_file=_coco_json(tmp_path, _three_annotations()), img_dir=archive)
    assert reader.records[0].path.is_file()
    assert reader.records[0].path == tmp_path / "images" / (prefix + "a.jpg")  # extracted next to the archive
    again = CocoInstanceReader(annotation_file=_coco_json(tmp_path, []), img_dir=archive)  # extracted once: reused
    assert again.records[0].path == reader.records[0].path


def test_unsafe_archive_is_refused_naming_the_member(tmp_path):
    archive = _tar_gz(tmp_path / "images.tar.gz", [("../evil.jpg", _image_bytes())])
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil\.jpg"):
        CocoInstanceReader(annotation_file=_coco_json(tmp_path, []), img_dir=archive)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "images").exists()


def test_remote_uri_must_be_staged_first(tmp_path):
    with pytest.raises(ValueError, match="stage the data first"):
        CocoInstanceReader(annotation_file=_coco_json(tmp_path, []), img_dir="s3://bucket/images.tar.gz")


# ---------------------------------------------------------------- panoptic
def _panoptic_files(tmp_path, *, archive):
    ids = np.zeros((H, W), dtype=np.int64)  # row 0 stays 0: unlabelled
    ids[1:10] = 1 + 256 * 3  # road (uses R and G)
    ids[10:] = 70000  # car, uses the B channel too
    ids[12:16, 3:8] = 5  # crowd of persons
    ids[16:, 20:] = 6  # category 4, not in the label map
    png = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(png, format="PNG")
    data = {"images": [{"id": 5, "file_name": "a.jpg", "height": H, "width": W}],
            "annotations": [{"image_id": 5, "file_name": "a.png", "segments_info": [
                {"id": 769, "category_id": 1, "iscrowd": 0}, {"id": 70000, "category_id": 7, "iscrowd": 0},
                {"id": 5, "category_id": 9, "iscrowd": 1}, {"id": 6, "category_id": 4, "iscrowd": 0}]}],
            "categories": CATEGORIES}
    (tmp_path / "annotations_panoptic.json").write_text(json.dumps(data))
    if archive:
        img_dir = _tar_gz(tmp_path / "images.tar.gz", [("a.jpg", _image_bytes())])
        pan_dir = _tar_gz(tmp_path / "images_panoptic.tar.gz", [("panoptic/a.png", png.getvalue())])
    else:
        img_dir = _image_folder(tmp_path)
        pan_dir = tmp_path / "pan"
        pan_dir.mkdir()
        (pan_dir / "a.png").write_bytes(png.getvalue())
    reader = CocoPanopticReader(annotation_file=tmp_path / "annotations_panoptic.json", img_dir=img_dir,
                                panoptic_dir=pan_dir)
    return reader, ids


def test_rgb_id_roundtrip():
    ids = np.array([[0, 1, 255, 256, 65535, 65536, 16777215]])
    np.testing.assert_array_equal(rgb_to_id(id_to_rgb(ids)), ids)


@pytest.mark.parametrize("archive", [False, True])
def test_panoptic_segments_targets_and_ground_truth(tmp_path, archive):
    reader, ids = _panoptic_files(tmp_path, archive=archive)
    segments = reader.load_segments(5)
    assert segments.exclusive
    masks = {s.segment_id: s.mask for s in segments.segments}
    np.testing.assert_array_equal(masks[70000], ids == 70000)
    targets = build_targets(segments, label_map=_label_map(), mode="panoptic")
    assert targets.labels.tolist() == [1, 7]
    expected_ignore = (ids == 0) | (ids == 5) | (ids == 6)
    np.testing.assert_array_equal(targets.ignore_mask, expected_ignore)
    assert (targets.sem_seg[expected_ignore] == 255).all()
    assert (targets.sem_seg[ids == 769] == 1).all()
    instance_targets = build_targets(segments, label_map=_label_map(), mode="instance")
    assert instance_targets.labels.tolist() == [7]  # things only
    truth = build_ground_truth(segments, label_map=_label_map())
    assert {(s["id"], s["category_id"], s["iscrowd"], s["isthing"]) for s in truth.segments_info} == {
        (769, 1, 0, 0), (70000, 7, 0, 1), (5, 9, 1, 1)}
    np.testing.assert_array_equal(truth.panoptic_seg, np.where(ids == 6, 0, ids))
    np.testing.assert_array_equal(truth.sem_seg, np.select([ids == 769, ids == 70000], [1, 7], 255))


def test_panoptic_missing_png_named(tmp_path):
    reader, _ = _panoptic_files(tmp_path, archive=False)
    (tmp_path / "pan" / "a.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        CocoPanopticReader(annotation_file=reader.annotation_file, img_dir=tmp_path / "images",
                           panoptic_dir=tmp_path / "pan")
    assert "a.png" in str(error.value) and "annotations_panoptic.json" in str(error.value)
