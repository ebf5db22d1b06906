"""A guard for the rule that a training step reads nothing back to the host.

On a GPU a read (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``, a boolean
mask index, ``nonzero``) stalls the CPU until the GPU has drained its queue, and cannot be
captured in a CUDA graph. On a CPU the same code runs without any cost to show it, so the
CPU tests patch these entry points to raise while the guarded code runs: what passes here
has no read for a GPU to stall on.

A step that reads back for a stated reason (a method's ``eager_reason``: a solver that runs
on the host) is held to where it says it reads: reads made while one of the functions named
in ``allowed_in`` runs are let through and recorded, any other read still raises.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Collection, Iterator
from types import CodeType, FunctionType

import torch

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "cpu")


@contextlib.contextmanager
def forbid_host_reads(allowed_in: Collection[FunctionType] = ()) -> Iterator[list[str]]:
    """Make every host read raise ``AssertionError`` while the block runs, except those made
    (directly or deeper) inside one of the functions ``allowed_in``; yields the list of the
    reads let through (``"Tensor.cpu in JUMBOT.alignment_loss"``), filled as they happen."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    getitem = torch.Tensor.__getitem__
    nonzero = torch.nonzero
    allowed: dict[CodeType, str] = {f.__code__: f.__qualname__ for f in allowed_in}
    let_through: list[str] = []

    def check(what: str) -> None:
        frame = sys._getframe(2)  # the caller of the patched entry point
        while frame is not None:
            if frame.f_code in allowed:
                let_through.append(f"{what} in {allowed[frame.f_code]}")
                return
            frame = frame.f_back
        raise AssertionError(f"a host read inside the step: {what}")

    def refuse(name: str, original: Callable) -> Callable:
        def read(*args, **kwargs):
            check(f"Tensor.{name}")
            return original(*args, **kwargs)
        return read

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            check("indexing with a boolean mask")
        return getitem(self, index)

    for name, original in saved.items():
        setattr(torch.Tensor, name, refuse(name, original))
    torch.Tensor.__getitem__ = checked_getitem
    torch.nonzero = refuse("nonzero", nonzero)
    try:
        yield let_through
    finally:
        for name, function in saved.items():
            setattr(torch.Tensor, name, function)
        torch.Tensor.__getitem__ = getitem
        torch.nonzero = nonzero
