"""Triton kernels of fastmam, installed as ``fastmam.kernels``.

This folder is mapped into the package by ``setup.py``
(``package_dir={"fastmam.kernels": "kernels"}``); it is never a top-level ``kernels``
package, a name that belongs to an existing PyPI project.

- ``patches``: visible-patch gather + normalize (``tube_mask_gather``), and the masked-token
  pixel / RGB-difference targets (``pixel_target``, ``rgb_diff_target``).

Kernels are imported on first use by ``fastmam.ops`` (its Triton backend); on CPU tensors they
run only under ``TRITON_INTERPRET=1`` (tests). The dual-decoder loss still runs its reference.
"""

#: names of the ops that have a Triton kernel in this build
AVAILABLE: frozenset[str] = frozenset({"tube_mask_gather", "pixel_target", "rgb_diff_target"})
