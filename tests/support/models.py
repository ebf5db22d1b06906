"""Small parcel batches and the checks the model tests share (tests/test_models.py on the
CPU, tests/test_gpu.py on a GPU): a random batch, a forward call, a tolerance on a whole
tensor, and the fused pixel-set encoder held to the plain modules' maths."""

import copy

import torch

B, T, S, C = 5, 7, 6, 10


def make_batch(seed: int = 0, batch: int = B, dates: int = T, pixels: int = S, padded: bool = True):
    """A small random batch; with ``padded`` some parcels have fewer valid pixels, one has exactly one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, pixels, dtype=torch.bool)
    if padded:
        mask[1, 3:] = False
        mask[2, 1:] = False  # a single valid pixel
    return {
        "pixels": torch.rand(batch, dates, pixels, C, generator=g),
        "mask": mask,
        "positions": torch.sort(torch.randint(0, 365, (batch, dates), generator=g), dim=1).values,
        "geom": torch.rand(batch, 4, generator=g),
    }


def run(model, batch):
    return model(batch["pixels"], batch["mask"], batch["positions"], batch["geom"])


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative error of the whole tensor. Sums over thousands of pixel rows are accumulated
    in an order that depends on the device, thread count and chunking (and GPU convolutions
    may use TF32), so a single element may differ by more than float32 rounding while the
    tensor as a whole agrees."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    error = float((got - want).norm() / want.norm().clamp_min(1e-12))
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:g}"


def reference_pixel_set_encoder(pse, pixels, mask, geom):
    """The Pixel-Set Encoder written plainly with the encoder's own modules (the public code's maths)."""
    valid = pixels.transpose(1, 2)[mask]  # (N, T, C), parcel by parcel
    hidden = pse.mlp1(valid)  # LinearBlock: Linear -> BatchNorm1d over every row -> ReLU
    means, stds, start = [], [], 0
    for n in mask.sum(1).tolist():
        h = hidden[start : start + n]
        start += n
        means.append(h.mean(0))
        stds.append(torch.sqrt(((h - h.mean(0)) ** 2).sum(0) / max(n - 1, 1) + 1e-31))
    stats = torch.cat([torch.stack(means), torch.stack(stds)], dim=-1)
    if pse.geom_dim:
        stats = torch.cat([stats, geom[:, None].expand(-1, pixels.shape[1], -1)], dim=-1)
    return pse.mlp2(stats)


def assert_fused_matches_plain(fused, batch: dict, output_tol: float, grad_tol: float) -> None:
    """The fused pixel-set encoder against :func:`reference_pixel_set_encoder` on a copy of
    itself: output, batch-norm running statistics (updated in train mode) and gradients."""
    plain = copy.deepcopy(fused)
    out = fused(batch["pixels"], batch["mask"], batch["geom"])
    expected = reference_pixel_set_encoder(plain, batch["pixels"], batch["mask"], batch["geom"])
    assert_near(out, expected, output_tol, "output")
    for key, value in plain.state_dict().items():
        got = fused.state_dict()[key]
        if value.is_floating_point():
            assert_near(got, value, output_tol, key)
        else:
            assert torch.equal(got, value), key
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(fused.parameters()))
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(plain.parameters()))
    for (name, _), got, want in zip(fused.named_parameters(), grads, expected_grads):
        assert_near(got, want, grad_tol, name)
