"""The Mask2Former network (Swin or EfficientViT backbone, deformable pixel decoder, masked-attention decoder) and
weight import. Matching, losses and post-processing live in the sibling modules ``matcher``,
``criterion``, ``point_sampling`` and ``postprocess``."""

from .builder import build_backbone, build_efficientvit_backbone, build_mask2former, build_model
from .meta_arch import Mask2Former
from .weights import ImportReport, import_weights

__all__ = ["ImportReport", "Mask2Former", "build_backbone", "build_efficientvit_backbone", "build_mask2former",
           "build_model", "import_weights"]
