"""Public ops of fastmam, drop-in for VideoMAE-style code.

Every op has a pure-PyTorch ``*_reference`` (the specification and the CPU path) and dispatches
by ``backend=`` / ``FASTMAM_BACKEND`` (``auto``, ``reference``, ``triton``, ``cuda``) to the
fastest implementation available for the input's device. Shapes and dtypes are in each docstring.
"""

from ._backend import BACKENDS, BackendUnavailableError, available
from .gather import (
    MaskedPatches,
    gather_tokens,
    gather_tokens_reference,
    normalize_patches,
    patchify_reference,
    scatter_tokens,
    scatter_tokens_reference,
    tube_mask_gather,
    tube_mask_gather_reference,
)
from .loss import LossOutput, dual_decoder_loss, dual_decoder_loss_reference
from .masking import (
    Masking,
    decoder_masking,
    decoder_masking_reference,
    decoder_noise_positions,
    num_decoded,
    random_masking,
    random_masking_reference,
    running_cell_map,
    tube_masking,
    tube_masking_reference,
)
from .motion_targets import (
    hog_target,
    hog_target_reference,
    trajectory_loss,
    trajectory_target,
    trajectory_target_reference,
)
from .targets import pixel_target, pixel_target_reference, rgb_diff_target, rgb_diff_target_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "LossOutput",
    "MaskedPatches",
    "Masking",
    "available",
    "decoder_masking",
    "decoder_masking_reference",
    "decoder_noise_positions",
    "dual_decoder_loss",
    "dual_decoder_loss_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "hog_target",
    "hog_target_reference",
    "normalize_patches",
    "num_decoded",
    "patchify_reference",
    "pixel_target",
    "pixel_target_reference",
    "random_masking",
    "random_masking_reference",
    "rgb_diff_target",
    "rgb_diff_target_reference",
    "running_cell_map",
    "scatter_tokens",
    "scatter_tokens_reference",
    "trajectory_loss",
    "trajectory_target",
    "trajectory_target_reference",
    "tube_mask_gather",
    "tube_mask_gather_reference",
    "tube_masking",
    "tube_masking_reference",
]

from . import (
    _cuda,  # noqa: E402,F401  (registers the CUDA C++ backend when fastmam._C is built)
    _triton,  # noqa: E402,F401  (registers the Triton backend when triton is importable)
)
