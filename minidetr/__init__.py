"""minidetr: DETR, Conditional DETR, SMCA-DETR and DN-DETR in small, readable PyTorch.

    cfg = minidetr.Config.for_variant("conditional", preset="tiny")
    model, criterion, postprocess = minidetr.build(cfg)

See README.md for the file-by-file map and DESIGN notes.
"""
from minidetr.config import Config
from minidetr.detr import build

__version__ = "0.1.0"
__all__ = ["Config", "build", "__version__"]
