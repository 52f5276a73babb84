"""Label maps: raw dataset category ids <-> model class indices.

A label map file (``label_map.json`` / ``label_map_panoptic.json``) is a JSON list of
``{"id": int, "name": str, "color": [r, g, b], "isthing": 0|1}``. ``color`` is optional (a fixed
colour is derived from the id) and so is ``isthing`` (default 1, as in COCO instance label maps).

Class indices follow upstream Mask2Former: ``num_classes`` real classes at 0..K-1, the no-object
logit is index K. With ``contiguous_id`` false the class index IS the raw id (so every raw id must be
< K); with ``contiguous_id`` true the class index is the entry's position in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from .json_files import MAX_CATEGORY_ID, load_json_file, preview

NUM_CLASSES_KEY = "model.sem_seg_head.num_classes"
IGNORE_VALUE = 255  # value of void/ignored pixels in semantic maps, so no class or raw id may take it


@dataclass(frozen=True)
class LabelEntry:
    """One category of a label map."""

    id: int
    name: str
    color: Tuple[int, int, int]
    isthing: bool


def default_color(raw_id: int) -> Tuple[int, int, int]:
    """A fixed, well-spread colour for a category without one (golden-ratio hue walk)."""
    hue = (raw_id * 0.618033988749895) % 1.0
    sector = int(hue * 6)
    frac = hue * 6 - sector
    high, low = 230, 40
    mid_up = int(low + (high - low) * frac)
    mid_down = int(high - (high - low) * frac)
    table = [(high, mid_up, low), (mid_down, high, low), (low, high, mid_up),
             (low, mid_down, high), (mid_up, low, high), (high, low, mid_down)]
    return table[sector % 6]


def _parse_entry(raw: object, *, position: int, source: str) -> LabelEntry:
    where = f"label map {source}, entry {position}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object {{id, name, color, isthing}}, got {preview(raw)}")
    if "id" not in raw or isinstance(raw["id"], bool) or not isinstance(raw["id"], int):
        raise ValueError(f"{where}: 'id' must be an integer, got {preview(raw.get('id'))}")
    if not 0 <= raw["id"] <= MAX_CATEGORY_ID:
        raise ValueError(f"{where}: 'id' must be in 0..{MAX_CATEGORY_ID}, got {raw['id']}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} (id {raw['id']}): 'name' must be a non-empty string, got {preview(name)}")
    color = raw.get("color")
    if color is None:
        color_t = default_color(raw["id"])
    else:
        if (not isinstance(color, (list, tuple)) or len(color) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
            raise ValueError(f"{where} (id {raw['id']}): 'color' must be [r, g, b] with integers 0..255, "
                             f"got {preview(color)}")
        color_t = (int(color[0]), int(color[1]), int(color[2]))
    isthing = raw.get("isthing", 1)
    if isthing not in (0, 1, True, False):
        raise ValueError(f"{where} (id {raw['id']}): 'isthing' must be 0/1 or true/false, got {preview(isthing)}")
    return LabelEntry(id=raw["id"], name=name, color=color_t, isthing=bool(isthing))


class LabelMap:
    """Mapping between raw category ids and class indices, with names, colours and thing flags."""

    def __init__(self, *, entries: Sequence[LabelEntry], contiguous_id: bool, num_classes: int,
                 source: str = "<memory>") -> None:
        if num_classes < 1:
            raise ValueError(f"{NUM_CLASSES_KEY} must be >= 1, got {num_classes}")
        if not entries:
            raise ValueError(f"label map {source} is empty: expected at least one {{id, name, color, isthing}}")
        seen: Dict[int, int] = {}
        for position, entry in enumerate(entries):
            if entry.id in seen:
                raise ValueError(f"label map {source}: id {entry.id} appears twice (entries {seen[entry.id]} "
                                 f"and {position})")
            seen[entry.id] = position
        if IGNORE_VALUE in seen:
            raise ValueError(f"label map {source}: category id {IGNORE_VALUE} is reserved for void/ignore pixels; "
                             f"renumber that category")
        if contiguous_id:
            if len(entries) > IGNORE_VALUE:
                raise ValueError(f"label map {source} has {len(entries)} categories; with dataset.contiguous_id true "
                                 f"at most {IGNORE_VALUE} fit because class index {IGNORE_VALUE} marks ignored pixels")
            if len(entries) > num_classes:
                raise ValueError(f"label map {source} has {len(entries)} categories but {NUM_CLASSES_KEY} is "
                                 f"{num_classes}: raise {NUM_CLASSES_KEY} to at least {len(entries)}")
            raw_to_index = {entry.id: position for position, entry in enumerate(entries)}
        else:
            for entry in entries:
                if entry.id >= num_classes:
                    raise ValueError(
                        f"label map {source}: category id {entry.id} ({entry.name!r}) is >= "
                        f"{NUM_CLASSES_KEY}={num_classes}; with dataset.contiguous_id false the class index is the "
                        f"raw id, so set {NUM_CLASSES_KEY} to at least {max(e.id for e in entries) + 1} or set "
                        f"dataset.contiguous_id true")
            raw_to_index = {entry.id: entry.id for entry in entries}
        self.entries: Tuple[LabelEntry, ...] = tuple(entries)
        self.contiguous_id = contiguous_id
        self.num_classes = num_classes
        self.source = source
        self._raw_to_index = raw_to_index
        self._index_to_entry = {raw_to_index[e.id]: e for e in entries}

    @classmethod
    def load(cls, path: str | Path, contiguous_id: bool, num_classes: int) -> "LabelMap":
        """Read a label map file (JSON list of {id, name, color, isthing})."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label map {path} (dataset.label_map) does not exist")
        data = load_json_file(path, describe="label map")
        if isinstance(data, dict) and "categories" in data:
            data = data["categories"]  # a COCO annotation file's categories are the same shape
        if not isinstance(data, list):
            raise ValueError(f"label map {path}: expected a JSON list of {{id, name, color, isthing}}, "
                             f"got {type(data).__name__}")
        entries = [_parse_entry(raw, position=i, source=str(path)) for i, raw in enumerate(data)]
        return cls(entries=entries, contiguous_id=contiguous_id, num_classes=num_classes, source=str(path))

    # raw id <-> class index
    def index_of(self, raw_id: int) -> Optional[int]:
        """Class index of a raw category id, or None when the id is not in the label map (void)."""
        return self._raw_to_index.get(int(raw_id))

    def raw_id_of(self, index: int) -> int:
        """Raw category id of a class index; KeyError naming the index when no category has it."""
        entry = self._index_to_entry.get(int(index))
        if entry is None:
            raise KeyError(f"class index {index} has no category in label map {self.source}")
        return entry.id

    @property
    def raw_to_index(self) -> Dict[int, int]:
        return dict(self._raw_to_index)

    @property
    def index_to_raw(self) -> Dict[int, int]:
        return {index: entry.id for index, entry in self._index_to_entry.items()}

    def categories(self) -> List[Dict[str, object]]:
        """The entries as COCO-style category dicts {id, name, color, isthing} (raw ids), file order."""
        return [{"id": e.id, "name": e.name, "color": list(e.color), "isthing": int(e.isthing)}
                for e in self.entries]

    # per-class attributes, keyed by class index
    @property
    def thing_classes(self) -> FrozenSet[int]:
        return frozenset(i for i, e in self._index_to_entry.items() if e.isthing)

    @property
    def stuff_classes(self) -> FrozenSet[int]:
        return frozenset(i for i, e in self._index_to_entry.items() if not e.isthing)

    @property
    def names(self) -> Dict[int, str]:
        return {i: e.name for i, e in self._index_to_entry.items()}

    @property
    def colors(self) -> Dict[int, Tuple[int, int, int]]:
        return {i: e.color for i, e in self._index_to_entry.items()}

    def is_thing(self, index: int) -> bool:
        entry = self._index_to_entry.get(int(index))
        return bool(entry and entry.isthing)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"LabelMap({len(self.entries)} categories, contiguous_id={self.contiguous_id}, "
                f"num_classes={self.num_classes}, source={self.source!r})")
