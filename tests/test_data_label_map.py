"""Label maps: raw id <-> class index in both modes, attributes, and the errors users meet."""

import json

import pytest

from mask2former.data.label_map import LabelMap, default_color

ENTRIES = [
    {"id": 1, "name": "sky", "color": [10, 20, 30], "isthing": 0},
    {"id": 7, "name": "circle", "color": [200, 0, 0], "isthing": 1},
    {"id": 12, "name": "triangle", "isthing": 1},
]


@pytest.fixture()
def label_map_file(tmp_path):
    path = tmp_path / "label_map_panoptic.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_raw_ids_are_indices_when_not_contiguous(label_map_file):
    label_map = LabelMap.load(label_map_file, contiguous_id=False, num_classes=13)
    assert [label_map.index_of(i) for i in (1, 7, 12)] == [1, 7, 12]
    assert label_map.index_of(5) is None  # not in the map: void
    assert label_map.raw_id_of(12) == 12
    assert label_map.thing_classes == {7, 12}
    assert label_map.stuff_classes == {1}
    assert label_map.names == {1: "sky", 7: "circle", 12: "triangle"}
    assert label_map.colors[7] == (200, 0, 0)
    assert label_map.colors[12] == default_color(12)  # colour is optional


def test_positions_are_indices_when_contiguous(label_map_file):
    label_map = LabelMap.load(label_map_file, contiguous_id=True, num_classes=3)
    assert label_map.raw_to_index == {1: 0, 7: 1, 12: 2}
    assert label_map.index_to_raw == {0: 1, 1: 7, 2: 12}
    assert label_map.thing_classes == {1, 2}
    assert label_map.names[2] == "triangle"
    with pytest.raises(KeyError, match="class index 5"):
        label_map.raw_id_of(5)


def test_raw_id_beyond_num_classes_names_id_file_and_key(label_map_file):
    with pytest.raises(ValueError) as error:
        LabelMap.load(label_map_file, contiguous_id=False, num_classes=10)
    message = str(error.value)
    assert "12" in message and str(label_map_file) in message
    assert "model.sem_seg_head.num_classes" in message


def test_contiguous_map_larger_than_num_classes(label_map_file):
    with pytest.raises(ValueError, match="3 categories.*model.sem_seg_head.num_classes is 2"):
        LabelMap.load(label_map_file, contiguous_id=True, num_classes=2)


@pytest.mark.parametrize("entries, fragment", [
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "id 1 appears twice"),
    ([{"id": 255, "name": "a"}], "255 is reserved"),
    ([{"id": "3", "name": "a"}], "'id' must be an integer"),
    ([{"id": 3}], "'name' must be a non-empty string"),
    ([{"id": 3, "name": "a", "color": [1, 2]}], "'color' must be"),
    ([{"id": 3, "name": "a", "isthing": 2}], "'isthing' must be"),
    ([], "is empty"),
])
def test_malformed_entries_are_named(tmp_path, entries, fragment):
    path = tmp_path / "label_map.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=fragment):
        LabelMap.load(path, contiguous_id=False, num_classes=300)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.label_map"):
        LabelMap.load(tmp_path / "nope.json", contiguous_id=False, num_classes=10)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LabelMap.load(bad, contiguous_id=False, num_classes=10)


def test_coco_annotation_file_categories_are_accepted(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": ENTRIES}))
    label_map = LabelMap.load(path, contiguous_id=True, num_classes=3)
    assert label_map.categories()[1] == {"id": 7, "name": "circle", "color": [200, 0, 0], "isthing": 1}
