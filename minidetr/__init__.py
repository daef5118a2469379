"""minidetr: DETR, Conditional DETR, SMCA-DETR and DN-DETR in small, readable PyTorch.

    cfg = minidetr.Config.for_variant("conditional", preset="tiny")
    model, criterion, postprocess = minidetr.build(cfg)

README.md has the file-by-file map; each module's docstring, the paper and equations it implements.
"""
from minidetr.config import Config
from minidetr.detr import build

__version__ = "0.1.0"
__all__ = ["Config", "build", "__version__"]
