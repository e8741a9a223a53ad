"""taming-transformers' own VQGAN (``taming.models.vqgan.VQModel``) as the reference of our tokenizer.

The PyPI wheel ``taming-transformers==0.0.1`` holds the model definition; install it without its declared
dependencies (torchvision, pytorch-lightning: not needed to build the model):
``pip install --no-deps taming-transformers==0.0.1``. ``VQModel`` subclasses ``pytorch_lightning.LightningModule``
and imports ``instantiate_from_config`` from ``taming.main`` (which imports torchvision); small stand-ins
for those two modules are put in ``sys.modules`` while it is imported, so the real class is built.

The published f16 configurations: ``configs/model.yaml`` of vqgan_imagenet_f16_1024 and _16384
(CompVis/taming-transformers, README "Overview of pretrained models"; the same ``ddconfig`` as the
repository's ``configs/imagenet_vqgan.yaml`` (n_embed 1024) and ``configs/custom_vqgan.yaml``):
embed_dim 256, n_embed 1024 / 16384, ddconfig double_z False, z_channels 256, resolution 256,
in_channels 3, out_ch 3, ch 128, ch_mult [1, 1, 2, 2, 4], num_res_blocks 2, attn_resolutions [16],
dropout 0.0.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
from torch import nn

F16_DDCONFIG = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
F16_EMBED_DIM = 256
F16_N_EMBED = {"vqgan_imagenet_f16_1024": 1024, "vqgan_imagenet_f16_16384": 16384}


def _instantiate_from_config(config):
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


def taming_vqmodel():
    """taming's ``VQModel`` class (skips the test when the taming-transformers wheel is not installed)."""
    pytest.importorskip("taming.modules.diffusionmodules.model",
                        reason="the reference VQGAN: pip install --no-deps taming-transformers==0.0.1")
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = nn.Module
    main = types.ModuleType("taming.main")
    main.instantiate_from_config = _instantiate_from_config
    stand_ins = {"pytorch_lightning": lightning, "taming.main": main, "main": main}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        sys.modules.pop("taming.models.vqgan", None)
        from taming.models.vqgan import VQModel
    finally:
        sys.modules.pop("taming.models.vqgan", None)
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return VQModel


def build_taming(ddconfig: dict, n_embed: int, embed_dim: int):
    """A taming ``VQModel`` (its loss replaced by ``torch.nn.Identity``: no LPIPS download, no parameters)."""
    return taming_vqmodel()(ddconfig=dict(ddconfig), lossconfig={"target": "torch.nn.Identity"}, n_embed=n_embed,
                            embed_dim=embed_dim)
