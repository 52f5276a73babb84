"""What an exported ONNX model records about itself (ONNX ``metadata_props``).

Runners read the mode and the class count from here instead of trusting the spec they are run with, and
the quantize and TensorRT steps carry the record forward. Keys::

    mask2former.format         "mask2former-airflow/1"
    mask2former.mode           panoptic | instance | semantic
    mask2former.num_classes    K (real classes)
    mask2former.topk           model.test_topk_per_image the graph was traced with
    mask2former.model_config   JSON of the checkpoint's model section
    mask2former.label_map      JSON list of {id, name, color, isthing}, or "null"
    mask2former.contiguous_id  "true" | "false"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import onnx

from ..checkpoint import FORMAT

PREFIX = "mask2former."


@dataclass
class ModelRecord:
    """The facts about a model that travel inside its ONNX file."""

    mode: str
    num_classes: int
    topk: int
    model_config: Dict[str, Any]
    label_map: Optional[List[Dict[str, Any]]] = None
    contiguous_id: bool = False

    def to_props(self) -> Dict[str, str]:
        return {
            PREFIX + "format": FORMAT,
            PREFIX + "mode": self.mode,
            PREFIX + "num_classes": str(self.num_classes),
            PREFIX + "topk": str(self.topk),
            PREFIX + "model_config": json.dumps(self.model_config, sort_keys=True),
            PREFIX + "label_map": json.dumps(self.label_map),
            PREFIX + "contiguous_id": "true" if self.contiguous_id else "false",
        }

    @classmethod
    def from_props(cls, props: Dict[str, str]) -> Optional["ModelRecord"]:
        """None when the file carries no record (an ONNX model written by another tool)."""
        if PREFIX + "mode" not in props:
            return None
        return cls(mode=props[PREFIX + "mode"], num_classes=int(props[PREFIX + "num_classes"]),
                   topk=int(props[PREFIX + "topk"]),
                   model_config=json.loads(props.get(PREFIX + "model_config", "{}")),
                   label_map=json.loads(props.get(PREFIX + "label_map", "null")),
                   contiguous_id=props.get(PREFIX + "contiguous_id", "false") == "true")


def write_record(model: onnx.ModelProto, record: ModelRecord) -> None:
    """Set (replace) the record's keys in ``model.metadata_props``; other keys stay."""
    props = record.to_props()
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_record(model: onnx.ModelProto) -> Optional[ModelRecord]:
    return ModelRecord.from_props({p.key: p.value for p in model.metadata_props})
