"""fastmam: fast motion-aware masked video pretraining.

Public pieces:

- ``fastmam.ops``: masking, gather, targets and the dual-decoder loss (reference + fused backends);
- ``fastmam.config``: the one typed config (``load_config``) and the DeepSpeed JSON derived from it;
- ``fastmam.models``: the MAM2 / VideoMAE encoder-regressor-decoder model;
- ``fastmam.data``: datasets and the resumable loader;
- ``fastmam/pretrain.py``: the training entry point.
"""

__version__ = "0.1.0"
