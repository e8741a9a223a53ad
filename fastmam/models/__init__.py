"""Models: the MAM2 / VideoMAE video ViT (``MaskedVideoModel``), its objective (``Pretrainer``) and tokenizers."""

from .attention import AttentionBackendError, attention_function, attention_reference
from .layers import Attention, Block, CrossAttention, CrossBlock, sinusoid_table
from .mam import MaskedVideoModel, ModelOutput, Pretrainer, appearance_values, build_tokenizer, motion_values
from .tokenizer import AppearanceTokenizer, RandomTokenizer, clip_codes
from .vqgan import VQGANTokenizer

__all__ = [
    "AppearanceTokenizer",
    "Attention",
    "AttentionBackendError",
    "Block",
    "CrossAttention",
    "CrossBlock",
    "MaskedVideoModel",
    "ModelOutput",
    "Pretrainer",
    "RandomTokenizer",
    "VQGANTokenizer",
    "appearance_values",
    "attention_function",
    "attention_reference",
    "build_tokenizer",
    "clip_codes",
    "motion_values",
    "sinusoid_table",
]
