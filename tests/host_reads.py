"""A guard for the rule that a training step reads nothing back to the host.

On a GPU a read (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``, a boolean
mask index, ``nonzero``) stalls the CPU until the GPU has drained its queue, and cannot be
captured in a CUDA graph. On a CPU the same code runs without any cost to show it, so the
CPU tests patch these entry points to raise while the guarded code runs: what passes here
has no read for a GPU to stall on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "cpu")


@contextlib.contextmanager
def forbid_host_reads() -> Iterator[None]:
    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    getitem = torch.Tensor.__getitem__
    nonzero = torch.nonzero

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"a host read inside the step: Tensor.{name}")
        return read

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("a host read inside the step: indexing with a boolean mask")
        return getitem(self, index)

    for name in _READS:
        setattr(torch.Tensor, name, refuse(name))
    torch.Tensor.__getitem__ = checked_getitem
    torch.nonzero = refuse("nonzero")
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.Tensor, name, function)
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = nonzero
