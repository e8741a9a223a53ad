"""Triton kernels of fastmam, installed as ``fastmam.kernels``.

This folder is mapped into the package by ``setup.py``
(``package_dir={"fastmam.kernels": "kernels"}``); it is never a top-level ``kernels``
package, a name that belongs to an existing PyPI project.

- ``patches``: visible-patch gather + normalize (``tube_mask_gather``) and the masked-token
  pixel / RGB-difference targets (``pixel_target``, ``rgb_diff_target``);
- ``cross_entropy``: the codebook cross-entropy with its gradient, in place, for the fused
  chunked ``dual_decoder_loss``;
- ``tokens``: ``gather_tokens`` / ``scatter_tokens``;
- ``motion``: MME's motion targets of the selected tokens (``hog_target``, ``trajectory_target``).

``fastmam.ops`` imports them on first use (its Triton backend; ``fastmam.ops.available(op)`` lists
which ops have one). On CPU tensors they run only under ``TRITON_INTERPRET=1`` (tests).
"""
