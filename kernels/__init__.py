"""Triton kernels of fastmam, installed as ``fastmam.kernels``.

This folder is mapped into the package by ``setup.py``
(``package_dir={"fastmam.kernels": "kernels"}``); it is never a top-level ``kernels``
package, a name that belongs to an existing PyPI project.

The fused kernels (tube-mask + gather, pixel / RGB-difference targets, dual-decoder
loss) land here; until then every op runs its pure-PyTorch reference from
``fastmam.ops`` and ``AVAILABLE`` is empty.
"""

#: names of the ops that have a Triton kernel in this build
AVAILABLE: frozenset[str] = frozenset()
