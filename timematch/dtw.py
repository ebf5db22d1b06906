"""Dynamic time warping on the device, batched over independent problems.

A DTW alignment between a series of length T and one of length U is a path of cells
``(s, t)`` from ``(0, 0)`` to ``(T-1, U-1)`` whose every move is one of ``(1, 1)``, ``(1, 0)``,
``(0, 1)``; :func:`dtw_path` returns, for a cost ``(K, T, U)`` (K problems at once: C-MAD's one
per class), the path of least summed cost as a 0/1 matrix ``(K, T, U)``, and its cost.

The dynamic programme ``A[s, t] = cost[s, t] + min(A[s-1, t-1], A[s-1, t], A[s, t-1])`` runs
over the T + U - 1 anti-diagonals: the cells of one anti-diagonal depend only on the two
before it, so each is one vectorised update of all K problems (no loop over cells or
problems); the path is read back from the stored moves in T + U - 1 more vectorised steps.
Everything stays on the cost's device; nothing is read back to the host.
"""

from __future__ import annotations

import torch

#: Moves of a DTW path, as stored per cell: where the cell was reached from.
DIAGONAL, FROM_ABOVE, FROM_LEFT = 0, 1, 2


@torch.no_grad()
def dtw_path(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-cost DTW path of each of K problems: ``(path (K, T, U) 0/1 in cost's dtype,
    total (K,))``. ``cost``: ``(K, T, U)`` or ``(T, U)`` (then the results have no K axis).
    Ties prefer the diagonal move, then the move from above."""
    if cost.dim() == 2:
        path, total = dtw_path(cost[None])
        return path[0], total[0]
    if cost.dim() != 3 or cost.shape[1] < 1 or cost.shape[2] < 1:
        raise ValueError(f"dtw_path needs a cost (K, T, U) with T, U >= 1, got {tuple(cost.shape)}")
    K, T, U = cost.shape
    device = cost.device
    work = cost.double()
    acc = torch.full((K, T + 1, U + 1), float("inf"), dtype=torch.float64, device=device)
    acc[:, 0, 0] = 0.0
    moves = torch.zeros((K, T + 1, U + 1), dtype=torch.int8, device=device)
    for k in range(2, T + U + 1):  # cells (i, j) with i + j = k, 1-based
        i = torch.arange(max(1, k - U), min(T, k - 1) + 1, device=device)
        j = k - i
        candidates = torch.stack([acc[:, i - 1, j - 1], acc[:, i - 1, j], acc[:, i, j - 1]])  # (3, K, n)
        best, move = candidates.min(dim=0)  # the first minimum: diagonal, then above
        acc[:, i, j] = work[:, i - 1, j - 1] + best
        moves[:, i, j] = move.to(torch.int8)
    path = torch.zeros((K, T, U), dtype=cost.dtype, device=device)
    problems = torch.arange(K, device=device)
    i = torch.full((K,), T, dtype=torch.long, device=device)
    j = torch.full((K,), U, dtype=torch.long, device=device)
    for _ in range(T + U - 1):  # the longest path; finished problems write nothing
        active = (i >= 1) & (j >= 1)
        path.index_put_((problems, (i - 1).clamp_min(0), (j - 1).clamp_min(0)), active.to(cost.dtype),
                        accumulate=True)
        move = moves[problems, i.clamp_min(0), j.clamp_min(0)].long()
        i = i - (active & (move != FROM_LEFT)).long()
        j = j - (active & (move != FROM_ABOVE)).long()
    return path, acc[:, T, U].to(cost.dtype)


def diagonal_path(T: int, U: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The path closest to the straight line from ``(0, 0)`` to ``(T-1, U-1)``: the DTW path of
    the cost ``|s / (T-1) - t / (U-1)|`` (0/1, ``(T, U)``): where a block-coordinate descent
    starts when no earlier path is known."""
    s = torch.arange(T, dtype=torch.float64, device=device) / max(T - 1, 1)
    t = torch.arange(U, dtype=torch.float64, device=device) / max(U - 1, 1)
    return dtw_path((s[:, None] - t[None, :]).abs())[0].to(dtype)


def path_offset(path: torch.Tensor, source_days: torch.Tensor, target_days: torch.Tensor) -> torch.Tensor:
    """Mean of ``source_days[s] - target_days[t]`` over the cells ``(s, t)`` of ``path`` (``(..., T,
    U)``): the days a target date moves by to meet the source date it is aligned with, TimeMatch's
    sign (target positions ``+ d`` align with the source). ``source_days`` (T,), ``target_days`` (U,)."""
    difference = source_days.double()[:, None] - target_days.double()[None, :]
    return ((path.double() * difference).sum((-2, -1)) / path.double().sum((-2, -1)).clamp_min(1.0)).float()
