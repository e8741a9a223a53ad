"""Data: the dataset interface, the resumable rank-sharded loader, and the synthetic default dataset."""

from .loader import StepBatchSampler, build_dataset, build_loader
from .synthetic import MOTIONS, SyntheticShapes

__all__ = ["MOTIONS", "StepBatchSampler", "SyntheticShapes", "build_dataset", "build_loader"]
