"""Parcel classifiers: shapes, padding, date positions, batched shifts, the fused pixel MLP,
sample-weighted batch statistics, no host reads, bf16."""

import copy

import pytest
import torch

from tests.support.host_reads import forbid_host_reads
from tests.support.models import B, C, T, assert_fused_matches_plain, assert_near, make_batch, run
from timematch.errors import ConfigError
from timematch.models import MODEL_NAMES, TimeSeriesClassifier, build_model
from timematch.models import pixel_mlp


def with_garbage_pixels(batch, extra: int = 3, seed: int = 1):
    """The same parcels with ``extra`` padded pixels of garbage (NaN, inf, huge) appended."""
    g = torch.Generator().manual_seed(seed)
    n, dates = batch["mask"].shape[0], batch["pixels"].shape[1]
    garbage = 1e6 * torch.randn(n, dates, extra, C, generator=g)
    garbage[0, 0, 0, 0], garbage[1, 2, 1, 3] = float("nan"), float("inf")
    return {
        **batch,
        "pixels": torch.cat([batch["pixels"], garbage], dim=2),
        "mask": torch.cat([batch["mask"], torch.zeros(n, extra, dtype=torch.bool)], dim=1),
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("with_geom", [False, True])
def test_output_shapes_and_split_calls(name, with_geom):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, with_geom=with_geom).eval()
    batch = make_batch()
    logits, features = run(model, batch)
    assert isinstance(model, TimeSeriesClassifier) and model.name == name
    assert logits.shape == (B, 3) and features.shape == (B, model.feature_dim) and model.feature_dim == 128
    emb = model.encode_pixels(batch["pixels"], batch["mask"], batch["geom"])
    assert emb.shape == (B, T, 128)
    split = model.classify(model.encode_time(emb, batch["positions"]))
    torch.testing.assert_close(split, logits)
    assert torch.isfinite(logits).all()


def test_geom_is_required_only_when_built_with_it():
    batch = make_batch()
    with pytest.raises(ValueError, match="geom"):
        build_model(num_classes=3, with_geom=True).eval()(batch["pixels"], batch["mask"], batch["positions"])
    model = build_model(num_classes=3).eval()  # geometric features are ignored
    torch.testing.assert_close(run(model, batch)[0], model(batch["pixels"], batch["mask"], batch["positions"])[0])


@pytest.mark.parametrize("train", [False, True])
def test_padded_pixels_change_nothing(train):
    torch.manual_seed(0)
    model = build_model(num_classes=4, with_geom=True)
    model.train()
    run(model, make_batch(seed=5))  # running statistics away from their initial values
    model.train(train)
    twin = copy.deepcopy(model)
    batch = make_batch()
    torch.manual_seed(1)  # same dropout masks
    clean = run(model, batch)
    torch.manual_seed(1)
    padded = run(twin, with_garbage_pixels(batch))
    torch.testing.assert_close(padded, clean)
    torch.testing.assert_close(twin.state_dict(), model.state_dict())  # batch-norm statistics too


@pytest.mark.parametrize("chunk_rows", [16384, 20])  # one chunk; many, the last one partial
@pytest.mark.parametrize("train", [True, False])
def test_fused_pixel_encoder_matches_plain_modules(monkeypatch, chunk_rows, train):
    monkeypatch.setattr(pixel_mlp, "CPU_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    fused = build_model(num_classes=4, with_geom=True).spatial_encoder
    fused.train()
    for seed in (7, 8):  # non-trivial running statistics
        batch = make_batch(seed=seed)
        fused(batch["pixels"], batch["mask"], batch["geom"])
    fused.train(train)
    assert_fused_matches_plain(fused, make_batch(), output_tol=1e-5, grad_tol=1e-4)


def test_single_valid_pixel_gives_finite_output_and_gradients():
    torch.manual_seed(0)
    model = build_model(num_classes=3).train()
    batch = make_batch()
    batch["mask"][:] = False
    batch["mask"][:, 0] = True  # every parcel has one valid pixel
    logits, _ = run(model, batch)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_parcel_without_valid_pixel_stays_finite():
    """The forward cannot check (it would read the mask back); the packed cache refuses such
    parcels (tests/test_reliability.py), and a stray one gives finite outputs, not NaN."""
    batch = make_batch()
    batch["mask"][3] = False
    model = build_model(num_classes=3).train()
    logits, _ = run(model, batch)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_position_range_is_checked_where_batches_are_built(name):
    model = build_model(name, num_classes=3).eval()
    assert model.position_range == (-100, 465)
    batch = make_batch()
    emb = model.encode_pixels(batch["pixels"], batch["mask"])
    edges = torch.full((B, T), -100)
    edges[:, -1] = 464
    model.check_positions(edges)
    model.check_positions(edges.numpy())
    model.check_positions((-100, 464))
    assert torch.isfinite(model.encode_time(emb, edges)).all()
    for bad in (-101, 465):
        positions = edges.clone()
        positions[2, 3] = bad
        with pytest.raises(ValueError, match=r"\[-100, 465\)"):
            model.check_positions(positions)
        with pytest.raises(ValueError, match=r"\[-100, 465\)"):
            model.check_positions(positions.numpy())
    with pytest.raises(ValueError, match="integer"):
        model.encode_time(emb, edges.float())  # a property of the tensor: checked without a read


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_encode_time_on_stacked_shifted_copies_equals_one_call_per_shift(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    batch = make_batch()
    shifts = [-60, -7, 0, 13, 60]
    with torch.inference_mode():
        emb = model.encode_pixels(batch["pixels"], batch["mask"])
        stacked = model.encode_time(
            emb.repeat(len(shifts), 1, 1),
            batch["positions"].repeat(len(shifts), 1) + torch.tensor(shifts).repeat_interleave(B)[:, None],
        )
        one_by_one = torch.cat([model.encode_time(emb, batch["positions"] + d) for d in shifts])
        full = torch.cat([run(model, {**batch, "positions": batch["positions"] + d})[1] for d in shifts])
    torch.testing.assert_close(stacked, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stacked[:B], stacked[2 * B : 3 * B])  # the shift matters


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_encode_time_shifted_equals_stacked_copies(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    batch = make_batch()
    shifts = torch.tensor([-100, -31, 0, 4, 100])
    positions = batch["positions"].clamp(0, 364)
    positions[:, 0] = 0
    with torch.inference_mode():
        emb = model.encode_pixels(batch["pixels"], batch["mask"])
        fast = model.encode_time_shifted(emb, positions, shifts)
        stacked = model.encode_time(emb.repeat(5, 1, 1), positions.repeat(5, 1) + shifts.repeat_interleave(B)[:, None])
    torch.testing.assert_close(fast, stacked, rtol=1e-5, atol=1e-5)


def test_pse_ltae_parameter_count():
    # PSE 2,560 + 16,640 | LTAE 33,280 + 32,896 + 128 + 33,024 | decoder 8,320 + 2,112 + 330
    count = sum(p.numel() for p in build_model("pse_ltae", num_classes=10).parameters())
    assert count == 129_290
    geom = sum(p.numel() for p in build_model("pse_ltae", num_classes=10, with_geom=True).parameters())
    assert geom == count + 4 * 128  # MLP2 takes 132 inputs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_model_and_outputs(name):
    batch = make_batch()
    outputs = []
    for _ in range(2):
        torch.manual_seed(42)
        model = build_model(name, num_classes=3).train()
        outputs.append((model.state_dict(), run(model, batch)[0]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, with_geom=True).train()
    logits, _ = run(model, make_batch(batch=8))
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 3).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_unknown_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="pse_ltae, pse_tae, pse_tempcnn, pse_gru"):
        build_model("transformer", num_classes=3)
    with pytest.raises(ConfigError, match="n_heads.*valid options.*n_head"):
        build_model("pse_ltae", num_classes=3, n_heads=4)
    with pytest.raises(ConfigError, match="d_model"):
        build_model("pse_ltae", num_classes=3, d_model=250)  # not divisible by 16 heads
    model = build_model("pse_ltae", num_classes=3, n_head=8, d_k=4, mlp1=[10, 16, 32], mlp2=[64, 128])
    assert model.temporal_encoder.query.shape == (8, 4)


def _no_dropout(name: str) -> dict:
    if name == "pse_gru":
        return {}
    return {"dropout": 0.0, **({"attention_dropout": 0.0} if name in ("pse_ltae", "pse_tae") else {})}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sample_weight_equals_forwarding_only_the_selected_samples(name):
    """What a captured FixMatch / TimeMatch step does instead of ``batch[confident]``: the same
    outputs on the selected rows, batch-norm running statistics and gradients."""
    torch.manual_seed(0)
    weighted = build_model(name, num_classes=4, **_no_dropout(name)).train()
    selected = copy.deepcopy(weighted)
    batch = make_batch(batch=9, dates=12, pixels=16)
    weight = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 0.0])
    keep = weight.bool()
    logits, _ = weighted(batch["pixels"], batch["mask"], batch["positions"], sample_weight=weight)
    expected, _ = selected(batch["pixels"][keep], batch["mask"][keep], batch["positions"][keep])
    assert_near(logits[keep], expected, 1e-5, "logits")
    for (key, got), want in zip(weighted.state_dict().items(), selected.state_dict().values()):
        if got.is_floating_point():
            assert_near(got, want, 1e-5, key)
        else:
            assert torch.equal(got, want), key
    classes = torch.arange(4.0)
    (logits[keep] * classes).sum().backward()
    (expected * classes).sum().backward()
    for (pname, p), q in zip(weighted.named_parameters(), selected.parameters()):
        # biases before a batch norm (and LTAE's key bias, which softmax ignores) have a zero
        # gradient in exact arithmetic: both sides are rounding noise there
        if q.grad.norm() > 1e-4:
            assert_near(p.grad, q.grad, 1e-4, pname)
        else:
            assert p.grad.norm() < 1e-4, pname


def test_fewer_than_two_weighted_samples_leave_the_running_statistics():
    torch.manual_seed(0)
    model = build_model(num_classes=3).train()
    before = copy.deepcopy(model.state_dict())
    batch = make_batch()
    for weight in (torch.zeros(B), torch.eye(B)[0]):
        logits, _ = model(batch["pixels"], batch["mask"], batch["positions"], sample_weight=weight)
        assert torch.isfinite(logits).all()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("train", [True, False])
def test_forward_reads_nothing_back_to_the_host(name, train):
    model = build_model(name, num_classes=3, with_geom=True).train(train)
    batch = make_batch()
    with forbid_host_reads():
        logits, _ = model(batch["pixels"], batch["mask"], batch["positions"], batch["geom"],
                          sample_weight=torch.tensor([1.0, 0, 1, 1, 0]) if train else None)
        if train:
            logits.sum().backward()


def test_unpadded_batch_skips_masking_with_the_same_result():
    torch.manual_seed(0)
    model = build_model(num_classes=3).train()
    twin = copy.deepcopy(model)
    batch = make_batch(padded=False)
    torch.manual_seed(1)
    padded, _ = run(model, batch)
    torch.manual_seed(1)
    plain, _ = twin(batch["pixels"], batch["mask"], batch["positions"], padded=False)
    assert_near(plain, padded, 1e-6, "logits")
    torch.testing.assert_close(twin.state_dict(), model.state_dict())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_trains_close_to_float32(name):
    """--precision bf16: the model under autocast (here the CPU's; the GPU's in test_gpu.py)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, **_no_dropout(name)).train()
    twin = copy.deepcopy(model)
    batch = make_batch(batch=8, dates=12, pixels=16)
    full, _ = run(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = run(twin, batch)
    assert half.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(half).all()
    assert_near(half.float(), full, 0.15, "logits")  # bf16 keeps ~3 digits; BN over 8 samples amplifies
    torch.nn.functional.cross_entropy(half.float(), torch.arange(8) % 3).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in twin.parameters() if p.requires_grad)
