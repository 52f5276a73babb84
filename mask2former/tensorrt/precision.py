"""Which layers of an FP16 engine stay in FP32, resolved against the ONNX graph's node names and op types.

Automatic rules (numerically sensitive parts of Mask2Former):

- op types whose FP16 versions lose accuracy or overflow: Softmax, LayerNormalization,
  InstanceNormalization / GroupNormalization (the pixel decoder's GroupNorm exports as
  InstanceNormalization), ReduceMean, Pow, Sqrt, Reciprocal, Exp, GridSample (deformable sampling
  positions), Sigmoid;
- Div nodes that divide by a normalisation's statistics (the divisor comes from Sqrt, Pow or ReduceMean,
  possibly through an Add of epsilon);
- EfficientViT's linear attention (nodes under a ``context_module`` scope): its MatMuls sum over every
  position of the map and its Div normalises by such a sum plus 1e-15, which FP16 would round to zero;
- the mask head: the MatMul/Einsum that multiplies the mask embeddings (``mask_embed``) with the per-pixel
  features, whose logits are thresholded at 0;
- the export's post-processing tensor stage (every node outside the network's ``/model/`` scope:
  softmax, sigmoid, top-k and mask scores).

User entries of ``gen_trt_engine.tensorrt.layers_precision`` ("pattern:fp32|fp16", fnmatch against the
node names) are applied last and override the rules.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Sequence

import onnx

FP32_OP_TYPES = frozenset({"Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                           "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Exp", "GridSample", "Sigmoid"})
NORMALISATION_SOURCES = frozenset({"Sqrt", "Pow", "ReduceMean"})
MASK_HEAD_OPS = frozenset({"MatMul", "Einsum"})
MASK_EMBED_SCOPE = "/mask_embed/"
LINEAR_ATTENTION_SCOPE = "/context_module/"
LINEAR_ATTENTION_OPS = frozenset({"MatMul", "Div", "Add"})
NETWORK_SCOPE = "/model/"  # InferenceModel wraps the network as ``self.model``
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class GraphNode:
    name: str
    op_type: str
    inputs: tuple
    outputs: tuple


@dataclass(frozen=True)
class LayerPrecision:
    node: str
    op_type: str
    precision: str
    reason: str


class LayerPatternError(ValueError):
    """A layers_precision entry that is malformed or matches no node of the graph."""


def graph_nodes(model: onnx.ModelProto) -> List[GraphNode]:
    """The nodes of an ONNX graph (top level), with names; unnamed nodes get ``<op_type>_<index>``."""
    return [GraphNode(name=node.name or f"{node.op_type}_{index}", op_type=node.op_type, inputs=tuple(node.input),
                      outputs=tuple(node.output)) for index, node in enumerate(model.graph.node)]


def parse_layer_patterns(entries: Sequence[str]) -> List[tuple]:
    """'pattern:fp32' entries -> [(pattern, precision)]; the pattern may itself contain ':'."""
    parsed = []
    for entry in entries:
        pattern, sep, precision = entry.rpartition(":")
        precision = precision.strip().lower()
        if not sep or not pattern or precision not in PRECISIONS:
            raise LayerPatternError(f"gen_trt_engine.tensorrt.layers_precision entry {entry!r} must read "
                                    "'layer_name_pattern:fp32' or 'layer_name_pattern:fp16'")
        parsed.append((pattern, precision))
    return parsed


def _producers(nodes: Iterable[GraphNode]) -> Dict[str, GraphNode]:
    return {output: node for node in nodes for output in node.outputs}


def _is_normalisation_div(node: GraphNode, producers: Mapping[str, GraphNode]) -> bool:
    if node.op_type != "Div" or len(node.inputs) < 2:
        return False
    divisor = producers.get(node.inputs[1])
    if divisor is None:
        return False
    if divisor.op_type in NORMALISATION_SOURCES:
        return True
    return divisor.op_type == "Add" and any(
        producers.get(i) is not None and producers[i].op_type in NORMALISATION_SOURCES for i in divisor.inputs)


def _is_mask_head(node: GraphNode, producers: Mapping[str, GraphNode]) -> bool:
    if node.op_type not in MASK_HEAD_OPS or MASK_EMBED_SCOPE in node.name:
        return False
    return any(producers.get(i) is not None and MASK_EMBED_SCOPE in producers[i].name for i in node.inputs)


def automatic_reason(node: GraphNode, producers: Mapping[str, GraphNode]) -> Optional[str]:
    """Why ``node`` stays in FP32 under the automatic rules, or None."""
    if not node.name.startswith(NETWORK_SCOPE):
        return "post-processing tensor stage"
    if node.op_type in FP32_OP_TYPES:
        return f"op type {node.op_type}"
    if _is_normalisation_div(node, producers):
        return "division by normalisation statistics"
    if node.op_type in LINEAR_ATTENTION_OPS and LINEAR_ATTENTION_SCOPE in node.name:
        return "linear attention (sums over all positions)"
    if _is_mask_head(node, producers):
        return "mask head (mask embeddings x pixel features)"
    return None


def resolve_layer_precisions(nodes: Sequence[GraphNode], *, fp16: bool,
                             patterns: Sequence[str] = ()) -> List[LayerPrecision]:
    """The per-node precision constraints of an engine build, in graph order.

    FP32 engines need none (everything runs in FP32; user patterns are refused there because they would
    do nothing). FP16 engines: the automatic FP32 rules, then the user patterns (each must match at least
    one node).
    """
    parsed = parse_layer_patterns(patterns)
    if not fp16:
        if parsed:
            raise LayerPatternError("gen_trt_engine.tensorrt.layers_precision applies to FP16 engines only; "
                                    "set tensorrt.data_type to FP16 or leave layers_precision empty")
        return []
    producers = _producers(nodes)
    chosen: Dict[str, LayerPrecision] = {}
    for node in nodes:
        reason = automatic_reason(node, producers)
        if reason is not None:
            chosen[node.name] = LayerPrecision(node=node.name, op_type=node.op_type, precision="fp32", reason=reason)
    for pattern, precision in parsed:
        matched = [node for node in nodes if fnmatch.fnmatchcase(node.name, pattern)]
        if not matched:
            examples = ", ".join(node.name for node in nodes[:3])
            raise LayerPatternError(f"gen_trt_engine.tensorrt.layers_precision pattern {pattern!r} matches no node "
                                    f"of the ONNX graph (node names look like: {examples})")
        for node in matched:
            chosen[node.name] = LayerPrecision(node=node.name, op_type=node.op_type, precision=precision,
                                               reason=f"layers_precision '{pattern}:{precision}'")
    order = {node.name: index for index, node in enumerate(nodes)}
    return sorted(chosen.values(), key=lambda item: order[item.node])


def match_layer(layer_name: str, node_names: Collection[str]) -> Optional[str]:
    """The ONNX node a TensorRT layer comes from, or None (a layer the parser or builder added).

    The parser names a layer after its node; a node that expands into several layers names the extra ones
    ``<node>_<suffix>``, ``<node>/<suffix>`` or ``<node> [<suffix>]``. The longest node name that is such a
    prefix wins, and a purely numeric suffix never counts (``/Div_1`` is another node than ``/Div``).
    """
    if layer_name in node_names:
        return layer_name
    for cut in range(len(layer_name) - 1, 0, -1):
        if layer_name[cut] not in "_/ [":
            continue
        prefix, rest = layer_name[:cut], layer_name[cut + 1:]
        if prefix in node_names and not rest.isdigit():
            return prefix
    return None
