"""The competitors' alignment signals are wired in and point where their papers say.

Two kinds of check for every competitor with a weighted alignment term (MMD, DANN, CDAN,
CDAN+E, JUMBOT, ALDA: ``trade_off``; MAD and C-MAD: ``alpha`` and ``beta``; RAINCOAT:
``sinkhorn_weight``):

1. **The term reaches the encoder.** On the real classifier (freshly initialised) and a batch
   of the synthetic tiles, one ``training_step`` with the weight at 0 and one with it on, everything else the
   same (weights, owned modules, batch, dropout draws): the gradients of the encoder (every
   parameter of the classifier outside ``model.decoder``) differ materially, and with the
   weight at 0 they are those of the plain source cross entropy. The adversarial methods are
   checked late in the warm start (global step 5,000, reversal coefficient 0.987), and at
   step 0, where the published schedule (coefficient 0) keeps the adversarial gradient off
   the encoder.

2. **The signal points the way the paper says**, over a few hundred steps of each method's
   own ``training_step`` (its losses, its discriminator, its reversal and warm start, its
   transport solver) on a tiny classifier and well-separated synthetic domains, the
   optimiser a plain Adam (the claims are about the direction of the signal, not about the
   published optimiser). What each paper says, and what is measured, is in each test's
   docstring; /work/shared/reference/methods.md and the methods' module docstrings give the
   losses.

The blob domains (DANN, CDAN, CDAN+E, ALDA, MMD, JUMBOT): 3-d inputs, two classes at
x0 = -2 and +2, noise 0.5 in every axis; the target is the source translated by 4 along x1
(8 noise widths: a discriminator tells the domains apart without error). The classifier
starts "source-trained" by construction: its 2-d features are (x0, x1) and its head reads
x0, so it classifies both domains and its features carry the whole domain gap. Aligning
means dropping x1 from the features while keeping x0 (the input has a third, pure-noise axis,
so the encoder can do it). Measured on 2,000 held-out samples per domain: the distance
between the domain means relative to the distance between the source class means (1.0 at
the start; a collapse of the features cannot lower it), and a fresh domain discriminator
(the project's :class:`DomainDiscriminator`, trained on the frozen features) as a probe of
whether the domains can still be told apart.

The series domains (MAD, C-MAD, RAINCOAT): 10 dates, 2 bands; class 0 has a bump in band 0
at date 2, class 1 at date 5; the target's bumps come 2 dates later and its band 1 is offset
by 3; the classifier is trained on the source first.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timematch.data.dataset import DataConfig, open_domains
from timematch.data.views import Batch, place_views
from timematch.methods import build_config, get_method, method_names
from timematch.methods.alignment import AlignmentMethod, DomainDiscriminator, domain_adversarial_loss, linear_mk_mmd
from timematch.models import build_model
from timematch.models.classifier import TimeSeriesClassifier
from timematch.step_engine import StepContext

CPU = torch.device("cpu")

#: Each competitor's alignment weights (config key -> the value that turns the term on: the
#: published default) and the keys held at one value in both steps.
ALIGNMENT_WEIGHTS = {
    "mmd": ({"trade_off": 1.0}, {}),
    "dann": ({"trade_off": 1.0}, {}),
    "cdan": ({"trade_off": 1.0}, {}),
    "cdan_e": ({"trade_off": 1.0}, {}),
    "jumbot": ({"trade_off": 1.0}, {}),
    "alda": ({"trade_off": 1.0}, {}),
    # ALDA with every target sample accepted: its corrected loss on the target in play too (a
    # fresh classifier is rarely 0.7 confident)
    "alda/accepted": ({"trade_off": 1.0}, {"pseudo_threshold": 0.0}),
    # MAD's two transport terms, each on its own: the feature cost along the DTW paths ...
    "mad": ({"alpha": 0.1}, {"beta": 0.0}),
    "cmad": ({"alpha": 0.1}, {"beta": 0.0}),
    # ... and the label cost of the transported target predictions
    "mad/beta": ({"beta": 0.01}, {"alpha": 0.0}),
    "cmad/beta": ({"beta": 0.01}, {"alpha": 0.0}),
    # the reconstruction is not an alignment term: off in both steps, so the weight-0 step is
    # the plain cross entropy
    "raincoat": ({"sinkhorn_weight": 1.0}, {"reconstruction_weight": 0.0}),
}
#: Config keys that weight a method's alignment term.
WEIGHT_KEYS = ("trade_off", "alpha", "beta", "sinkhorn_weight")
#: Methods with such a key that is not an alignment term: the weight of their pseudo-label
#: consistency loss on the target (``trade_off``), no feature alignment.
NOT_ALIGNMENT = {"fixmatch", "timematch"}
#: Late in the published warm start (max_iters 1000): reversal coefficient 2/(1+e^-5)-1 = 0.987.
LATE_STEP = 5000


def test_every_method_with_an_alignment_weight_is_checked():
    """A competitor registered later (an alignment method, or a method with a weight key) joins
    this file's list."""
    registered = {name: get_method(name) for name in method_names()}
    alignment = {name for name, cls in registered.items() if issubclass(cls, AlignmentMethod)}
    weighted = {name for name, cls in registered.items()
                if {f.name for f in dataclasses.fields(cls.config_class)} & set(WEIGHT_KEYS)}
    checked = {case.split("/")[0] for case in ALIGNMENT_WEIGHTS}
    assert alignment <= checked
    assert weighted - NOT_ALIGNMENT == checked
    assert not alignment & NOT_ALIGNMENT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is several times faster on a shared 2-core machine (measured:
    a step of the real classifier on 2 x 8 parcels, 0.04 s on one thread, 0.3-1.2 s on two
    under load), and every sum runs in one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 1. the alignment term reaches the encoder -------------------------------------------


@pytest.fixture(scope="module")
def domains(synthetic_root, tmp_path_factory):
    return open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10),
                        tmp_path_factory.mktemp("signals-cache"))


def _method(name: str, overrides: dict, domains):
    """Method ``name`` on a fresh classifier, built from one seed: the same classifier and owned
    modules (discriminator, CDAN's random map, RAINCOAT's branch and decoder) every time."""
    source, target = domains
    torch.manual_seed(0)
    model = build_model(num_classes=len(source.classes))
    method = get_method(name)(build_config(name, {"batch_size": 8, **overrides}), model, source, target, CPU)
    method.views = place_views(source, target, CPU, 1.0, 0)
    method.set_train_mode()
    return method


def _states(method) -> dict[str, torch.Tensor]:
    states = {f"model.{k}": v for k, v in method.model.state_dict().items()}
    for owner, owned in method.owned.items():
        states.update({f"{owner}.{k}": v for k, v in owned.module.state_dict().items()})
    return states


def _encoder_gradient(model: nn.Module) -> torch.Tensor:
    """The gradients of every classifier parameter outside ``model.decoder``, flattened (zeros
    where a parameter got none)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad
             for name, p in model.named_parameters() if not name.startswith("decoder.")]
    return torch.cat([g.flatten() for g in grads])


def _step_gradient(method, batch, step: int) -> torch.Tensor:
    torch.manual_seed(2)  # the model's dropout draws, the same in every step
    loss, _ = method.training_step(batch, StepContext(torch.tensor(step), 500, 10_000))
    loss.backward()
    return _encoder_gradient(method.model)


def _cross_entropy_gradient(method, batch) -> torch.Tensor:
    """The gradient of the source cross entropy alone, from the forward pass the step makes
    (both domains' batches in one pass, as the batch-norm statistics see them)."""
    source = batch["source"]
    torch.manual_seed(2)
    out = method.date_outputs(Batch.concat(source, batch["target"]))
    F.cross_entropy(out.logits[: len(source)].float(), source.label).backward()
    return _encoder_gradient(method.model)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", list(ALIGNMENT_WEIGHTS))
def test_the_alignment_term_reaches_the_encoder(case, domains):
    """Weight 0 vs the published weight, one step on the same batch from the same weights: the
    encoder's gradients differ by more than 0.1 % of their norm, and at weight 0 they are the
    source cross entropy's (to 1e-5)."""
    name = case.split("/")[0]
    on, fixed = ALIGNMENT_WEIGHTS[case]
    off = _method(name, {**fixed, **{key: 0.0 for key in on}}, domains)
    weighted = _method(name, {**fixed, **on}, domains)
    plain = _method(name, fixed, domains)
    for other in (weighted, plain):
        for key, value in _states(off).items():
            assert torch.equal(value, _states(other)[key]), f"{name}: {key} differs before the step"
    torch.manual_seed(1)
    batch = off.sample()

    g_off = _step_gradient(off, batch, LATE_STEP)
    g_on = _step_gradient(weighted, batch, LATE_STEP)
    g_ce = _cross_entropy_gradient(plain, batch)
    assert g_off.norm() > 0 and g_on.isfinite().all()
    change, plain_error = _relative(g_on, g_off), _relative(g_off, g_ce)
    print(f"{case}: |g_on - g_off| / |g_off| = {change:.3e}, |g_off - g_ce| / |g_ce| = {plain_error:.1e}")
    assert change > 1e-3, f"{case}: the alignment term moves the encoder's gradient by {change:.2e} only"
    assert plain_error < 1e-5, f"{case}: at weight 0 the step is not the source cross entropy ({plain_error:.1e})"


@pytest.mark.parametrize("name", ["dann", "cdan", "cdan_e"])
def test_the_warm_start_keeps_the_adversarial_gradient_off_the_encoder_at_step_0(name, domains):
    """DANN's schedule (Ganin et al. 2016, lambda_p = 2 / (1 + exp(-10 p)) - 1, here
    2 / (1 + exp(-i / 1000)) - 1) is 0 at the first step: the reversed gradient reaches the
    discriminator only, so the encoder's gradient is the cross entropy's; at step 5,000 it is
    not (previous test)."""
    method = _method(name, {}, domains)
    plain = _method(name, {}, domains)
    torch.manual_seed(1)
    batch = method.sample()
    g_step = _step_gradient(method, batch, 0)
    g_ce = _cross_entropy_gradient(plain, batch)
    error = _relative(g_step, g_ce)
    print(f"{name} at step 0: |g_step - g_ce| / |g_ce| = {error:.1e}")
    assert error < 1e-5
    discriminator = torch.cat([p.grad.flatten() for p in method.discriminator.parameters() if p.grad is not None])
    assert discriminator.norm() > 0, "the discriminator learns from the first step"


# -- 2. the signal points the way the paper says -----------------------------------------


class PixelMean(nn.Module):
    """Spatial encoder: each date's mean over the real pixels, mapped linearly: (B, T, out_dim)."""

    def __init__(self, bands: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(bands, out_dim)
        self.out_dim = out_dim

    def forward(self, pixels, mask, geom=None, padded=True):
        weights = mask.to(pixels.dtype)[:, None, :, None]
        return self.linear((pixels * weights).sum(2) / weights.sum(2))


class DateMean(nn.Module):
    """Temporal encoder: the mean over dates, mapped linearly."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, embeddings, positions):
        return self.linear(embeddings.mean(1))


class DateFlatten(nn.Module):
    """Temporal encoder: every date's embedding, in order, mapped linearly (reads the timing)."""

    def __init__(self, dates: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dates * in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, embeddings, positions):
        return self.linear(embeddings.flatten(1))


def _batch(x: torch.Tensor, label: torch.Tensor, days: torch.Tensor) -> Batch:
    """Series ``x`` (B, T, bands) as a batch of one-pixel parcels dated ``days`` (T,)."""
    n, T = x.shape[:2]
    return Batch(pixels=x[:, :, None, :], mask=torch.ones(n, 1, dtype=torch.bool),
                 positions=days.expand(n, T).clone(), geom=torch.zeros(n, 4), label=label,
                 index=torch.arange(n), padded=False)


class Blobs:
    """Two classes at x0 = -2, +2 (noise 0.5 in every axis of 3); the target translated by 4 along x1."""

    DIM = 3
    CENTRES = torch.tensor([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    SHIFT = torch.tensor([0.0, 4.0, 0.0])
    DAYS = torch.zeros(1, dtype=torch.long)

    def domain(self, n: int, g: torch.Generator, shift: torch.Tensor):
        y = torch.randint(0, 2, (n,), generator=g)
        x = self.CENTRES[y] + 0.5 * torch.randn(n, self.DIM, generator=g) + shift
        return x[:, None, :], y

    def draw(self, n: int, g: torch.Generator) -> dict[str, Batch]:
        xs, ys = self.domain(n, g, torch.zeros(self.DIM))
        xt, _ = self.domain(n, g, self.SHIFT)
        return {"source": _batch(xs, ys, self.DAYS), "target": _batch(xt, torch.full((n,), -1), self.DAYS)}

    def model(self) -> TimeSeriesClassifier:
        """Source-trained by construction: features (x0, x1), the head reads x0."""
        model = TimeSeriesClassifier("toy", PixelMean(self.DIM, 2), DateMean(2, 2), 2, decoder=(2,))
        with torch.no_grad():
            model.spatial_encoder.linear.weight.copy_(torch.eye(2, self.DIM))
            model.temporal_encoder.linear.weight.copy_(torch.eye(2))
            model.decoder[-1].weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            for bias in (model.spatial_encoder.linear.bias, model.temporal_encoder.linear.bias,
                         model.decoder[-1].bias):
                bias.zero_()
        return model


class Series:
    """10 dates 30 days apart, 2 bands: a bump in band 0 at date 2 (class 0) or 5 (class 1),
    noise 0.3; the target's bumps 2 dates later and its band 1 offset by 3."""

    T, BANDS, DELAY, OFFSET = 10, 2, 2, 3.0
    DAYS = torch.arange(10) * 30

    def domain(self, n: int, g: torch.Generator, delay: int, offset: float):
        y = torch.randint(0, 2, (n,), generator=g)
        centre = torch.tensor([2.0, 5.0])[y] + delay
        t = torch.arange(self.T, dtype=torch.float32)
        x = torch.zeros(n, self.T, self.BANDS)
        x[:, :, 0] = 3.0 * torch.exp(-0.5 * ((t[None] - centre[:, None]) / 0.8) ** 2)
        x[:, :, 1] = offset
        return x + 0.3 * torch.randn(n, self.T, self.BANDS, generator=g), y

    def draw(self, n: int, g: torch.Generator) -> dict[str, Batch]:
        xs, ys = self.domain(n, g, 0, 0.0)
        xt, _ = self.domain(n, g, self.DELAY, self.OFFSET)
        return {"source": _batch(xs, ys, self.DAYS), "target": _batch(xt, torch.full((n,), -1), self.DAYS)}

    def model(self) -> TimeSeriesClassifier:
        """Trained on the source alone (100 Adam steps: source cross entropy below 1e-3)."""
        torch.manual_seed(0)
        model = TimeSeriesClassifier("toy", PixelMean(self.BANDS, 4), DateFlatten(self.T, 4, 4), 2, decoder=(4,))
        optimizer = torch.optim.Adam(model.parameters(), 1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            source = self.draw(64, g)["source"]
            loss = F.cross_entropy(model(source.pixels, source.mask, source.positions)[0], source.label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert float(loss.detach()) < 1e-2
        return model


def _toy_method(name: str, domains, overrides: dict | None = None):
    """Method ``name`` on the toy classifier of ``domains`` (Blobs or Series), 64 samples per
    domain and step unless ``overrides`` says otherwise."""
    torch.manual_seed(0)
    bands = domains.DIM if isinstance(domains, Blobs) else domains.BANDS
    # what the constructors read of a domain: the class list (the discriminators' and maps'
    # widths), the band count (RAINCOAT's reconstruction)
    source = SimpleNamespace(classes=["a", "b"], packed=SimpleNamespace(pixels=torch.zeros(1, 1, 1, bands)))
    config = build_config(name, {"batch_size": 64, **(overrides or {})})
    return get_method(name)(config, domains.model(), source, SimpleNamespace(classes=["a", "b"]), CPU)


def _train(method, domains, steps: int, lr: float = 3e-3, every: int = 0, probe=None):
    """``steps`` steps of the method's ``training_step`` (the model and the method's trainable
    modules under one Adam); the step logs, and ``probe(method)`` every ``every`` steps."""
    owned = [p for o in method.owned.values() if o.trainable for p in o.module.parameters()]
    optimizer = torch.optim.Adam(list(method.model.parameters()) + owned, lr)
    g = torch.Generator().manual_seed(1)
    logs, probes = [], []
    method.set_train_mode()
    for i in range(steps):
        batch = domains.draw(method.config.batch_size, g)
        loss, log = method.training_step(batch, StepContext(torch.tensor(i), steps, steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logs.append({k: float(v) for k, v in log.items()})
        if every and (i + 1) % every == 0:
            probes.append(probe(method))
    return logs, probes


def _mean(logs: list[dict], key: str, start: int, stop: int | None = None) -> float:
    window = logs[start:stop]
    return sum(log[key] for log in window) / len(window)


def _held_out(domains) -> dict[str, Batch]:
    return domains.draw(2000, torch.Generator().manual_seed(99))


def _features(model, batch: Batch):
    with torch.no_grad():
        return model(batch.pixels, batch.mask, batch.positions, batch.geom)


def _probe_accuracy(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """A fresh domain discriminator (64 wide) trained 150 Adam steps on batches of 128 per domain
    from the first half of the features, its accuracy on the second half (0.5: the domains
    cannot be told apart)."""
    torch.manual_seed(0)
    discriminator = DomainDiscriminator(fs.shape[1], 64)
    optimizer = torch.optim.Adam(discriminator.parameters(), 1e-2)
    half = fs.shape[0] // 2
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = torch.randint(0, half, (128,), generator=g)
        loss, _ = domain_adversarial_loss(discriminator(torch.cat([fs[rows], ft[rows]])), 128)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    discriminator.eval()
    with torch.no_grad():
        _, accuracy = domain_adversarial_loss(discriminator(torch.cat([fs[half:], ft[half:]])), fs.shape[0] - half)
    return float(accuracy)


def _domain_measures(model, held_out: dict[str, Batch]) -> dict[str, float]:
    """On held-out features: ``gap`` (distance of the domain means / distance of the source
    class means), ``probe`` (:func:`_probe_accuracy`), ``mmd`` (linear-time MK-MMD estimate),
    ``source_accuracy``."""
    source = held_out["source"]
    logits, fs = _features(model, source)
    _, ft = _features(model, held_out["target"])
    classes = (fs[source.label == 0].mean(0) - fs[source.label == 1].mean(0)).norm()
    return {"gap": float((fs.mean(0) - ft.mean(0)).norm() / classes), "probe": _probe_accuracy(fs, ft),
            "mmd": float(linear_mk_mmd(fs, ft)),
            "source_accuracy": float((logits.argmax(1) == source.label).float().mean())}


def _report(name: str, before: dict, after: dict, **more) -> str:
    """One line of numbers, shown with ``-s`` and in an assertion's message."""
    fields = [f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before] + [f"{k} {v}" for k, v in more.items()]
    line = f"{name}: " + ", ".join(fields)
    print(line)
    return line


#: The adversarial methods in the toy: the warm start over the first ~300 of 600 steps
#: (coefficient 0.76 at step 100, 0.96 at 200), a discriminator 64 wide instead of 1024.
TOY_ADVERSARIAL = {"grl_max_iters": 100, "discriminator_hidden": 64}
ADVERSARIAL_STEPS = 600


@pytest.mark.parametrize("name", ["dann", "cdan", "cdan_e"])
def test_adversarial_training_confuses_the_discriminator_and_brings_the_domains_together(name):
    """DANN (Ganin et al., JMLR 2016): the domain discriminator D minimises
    0.5 [BCE(D(R(phi_s)), 1) + BCE(D(R(phi_t)), 0)] and, through the reversal R, the features
    maximise it; at the saddle point the features are domain-invariant, D is at chance.
    CDAN / CDAN+E (Long et al., NeurIPS 2018): the same game with D reading the multilinear
    map phi (x) g of features and (detached) predictions, CDAN+E weighting samples by
    1 + exp(-H(g)).

    Measured over 600 steps: D's accuracy (the method's own log, per step) while the warm
    start holds the reversal near 0 (steps 30-100: near 1, D wins) and over the last 150
    steps (near 0.5, D at chance); the domain gap (means' distance / class means' distance)
    and a fresh discriminator's accuracy on the held-out features (near 1 before) both fall;
    the source stays classified."""
    domains = Blobs()
    method = _toy_method(name, domains, TOY_ADVERSARIAL)
    held_out = _held_out(domains)
    before = _domain_measures(method.model, held_out)
    logs, _ = _train(method, domains, ADVERSARIAL_STEPS)
    after = _domain_measures(method.model, held_out)
    early = _mean(logs, "discriminator_accuracy", 30, 100)
    late = _mean(logs, "discriminator_accuracy", ADVERSARIAL_STEPS - 150)
    line = _report(name, before, after, discriminator_accuracy=f"{early:.3f} (steps 30-100) -> {late:.3f} "
                   f"(last 150 of {ADVERSARIAL_STEPS})")
    assert before["probe"] > 0.99 and before["gap"] > 0.9, line
    assert early > 0.95, line
    assert abs(late - 0.5) < 0.15, line
    assert after["gap"] < 0.25 * before["gap"], line
    assert after["probe"] < 0.8, line
    assert after["source_accuracy"] > 0.99, line


def _alda_domain_accuracy(held_out: dict[str, Batch]):
    """ALDA's discriminator tells the domains apart through xi at the predicted class (trained
    towards 1 on the source, towards 0 on the target): its accuracy with xi > 0.5 read as
    "source", on held-out features."""

    def measure(method) -> float:
        with torch.no_grad():
            xi = []
            method.discriminator.eval()
            for batch in (held_out["source"], held_out["target"]):
                logits, features = _features(method.model, batch)
                xi.append(torch.sigmoid(method.discriminator(features)).gather(1, logits.argmax(1, keepdim=True)))
            method.discriminator.train()
        return float(0.5 * ((xi[0] > 0.5).float().mean() + (xi[1] <= 0.5).float().mean()))

    return measure


def test_alda_adversarial_loss_takes_away_its_discriminator_s_view_of_the_domains():
    """ALDA (Chen et al., AAAI 2020): the discriminator's xi = sigmoid(D(phi)) builds the
    noise-correcting matrix eta; D minimises L_adv = BCE(c_s, y_s) + BCE(c_t, (1 - y^_t)/(K-1))
    (so xi at the predicted class is high on the source and low on the target: it tells the
    domains apart, class by class), while the features, through the reversal, maximise it:
    the target's predictions look as right to D as the source's.

    Measured over 600 steps, every 30 steps on held-out data: D's domain accuracy (xi > 0.5 at
    the predicted class read as source) near 1 in the warm start, near 0.5 over the last third;
    the domain gap and a fresh discriminator's accuracy fall; the source stays classified."""
    domains = Blobs()
    method = _toy_method("alda", domains, TOY_ADVERSARIAL)
    held_out = _held_out(domains)
    before = _domain_measures(method.model, held_out)
    logs, accuracy = _train(method, domains, ADVERSARIAL_STEPS, every=30, probe=_alda_domain_accuracy(held_out))
    after = _domain_measures(method.model, held_out)
    third = len(accuracy) // 3
    early, late = max(accuracy[:third]), sum(accuracy[-third:]) / third
    line = _report("alda", before, after,
                   alda_discriminator_accuracy=f"{early:.3f} (best of steps 30-{30 * third}) -> {late:.3f} "
                   f"(last {30 * third} of {ADVERSARIAL_STEPS})",
                   adversarial_loss=f"{_mean(logs, 'adversarial_loss', 0, 100):.3f} (first 100) -> "
                   f"{_mean(logs, 'adversarial_loss', ADVERSARIAL_STEPS - 100):.3f} (last 100)",
                   acceptance=f"{_mean(logs, 'pseudo_label_acceptance', 0):.3f}")
    assert early > 0.95, line
    assert abs(late - 0.5) < 0.15, line
    assert after["gap"] < 0.25 * before["gap"], line
    assert after["probe"] < 0.9, line
    assert after["source_accuracy"] > 0.99, line


def test_mmd_moves_the_target_features_to_the_source():
    """DAN (Long et al., ICML 2015): minimising CE + trade_off * MK-MMD^2(phi_s, phi_t) moves
    the feature distributions together: the MMD estimate (on held-out features, the project's
    ``linear_mk_mmd``) and the domain gap fall, and (once the offset axis has shrunk below the
    noise the other axes mix in) a fresh discriminator can no longer tell the domains apart;
    the source stays classified. 600 steps."""
    domains = Blobs()
    method = _toy_method("mmd", domains)
    held_out = _held_out(domains)
    before = _domain_measures(method.model, held_out)
    logs, _ = _train(method, domains, 600)
    after = _domain_measures(method.model, held_out)
    line = _report("mmd", before, after, step_mmd=f"{_mean(logs, 'mmd', 0, 20):.3f} (first 20) -> "
                   f"{_mean(logs, 'mmd', 500):.3f} (last 100 of 600)")
    assert after["mmd"] < 0.05 * before["mmd"], line
    assert after["gap"] < 0.25 * before["gap"], line
    assert after["probe"] < 0.8, line
    assert after["source_accuracy"] > 0.99, line


def test_jumbot_transport_cost_falls_and_the_domain_means_approach():
    """JUMBOT (Fatras et al., ICML 2021): the model minimises sum_ij pi_ij C_ij for the unbalanced
    OT plan pi (held fixed) of C_ij = eta1 ||phi_s,i - phi_t,j||^2 + eta2 CE(y_s,i, f(x_t,j)):
    the OT loss (the method's ``transfer_loss``) falls and the domain means approach; the source
    stays classified. 150 steps at lr 1e-2 (POT's solver on the host, about 20 ms a step, is
    the slow part).

    The fresh discriminator is not asked to fail here: in this linear toy the squared-distance
    cost shrinks the target's offset axis, noise and shift together, which brings the means
    together without mixing the domains (the shrink is measured by the gap)."""
    domains = Blobs()
    method = _toy_method("jumbot", domains)
    held_out = _held_out(domains)
    before = _domain_measures(method.model, held_out)
    logs, _ = _train(method, domains, 150, lr=1e-2)
    after = _domain_measures(method.model, held_out)
    first, last = _mean(logs, "transfer_loss", 0, 20), _mean(logs, "transfer_loss", 120)
    line = _report("jumbot", before, after, transfer_loss=f"{first:.4f} (first 20) -> {last:.4f} (last 30 of 150)",
                   transported_mass=f"{_mean(logs, 'transported_mass', 0):.3f}",
                   ot_failures=int(sum(log["ot_failures_count"] for log in logs)))
    assert last < 0.3 * first, line
    assert after["gap"] < 0.3 * before["gap"], line
    assert after["mmd"] < 0.25 * before["mmd"], line
    assert after["source_accuracy"] > 0.99, line
    assert all(log["ot_failures_count"] == 0 for log in logs), line


def _embedding_spread(model, held_out: dict[str, Batch]) -> float:
    """Mean squared distance of the source's per-date embeddings to their mean, per date: the
    scale a transport cost of those embeddings is measured against."""
    source = held_out["source"]
    with torch.no_grad():
        dates = model.forward_dates(source.pixels, source.mask, source.positions).dates
    return float((dates - dates.mean(0)).pow(2).sum(-1).mean())


@pytest.mark.parametrize("name", ["mad", "cmad"])
def test_mad_transport_cost_falls(name):
    """MAD / C-MAD (Painblanc et al., ECML-PKDD 2023): with the plan gamma and the DTW path(s)
    pi found by block-coordinate descent and held fixed, the model minimises
    alpha sum_ij gamma_ij sum_st pi_st ||x_i,s - x'_j,t||^2 / ((T + U) / 2)
    + beta sum_ij gamma_ij CE(y_i, f(x'_j)): both transport terms fall over the steps (the
    method's ``transport_cost`` and ``label_transport``), and the feature term falls relative
    to the spread of the source's embeddings too (so not by shrinking every embedding alike);
    the plan is found every step. 300 steps."""
    domains = Series()
    method = _toy_method(name, domains)
    held_out = _held_out(domains)
    spread_before = _embedding_spread(method.model, held_out)
    logs, _ = _train(method, domains, 300)
    spread_after = _embedding_spread(method.model, held_out)
    cost = (_mean(logs, "transport_cost", 0, 30), _mean(logs, "transport_cost", 270))
    labels = (_mean(logs, "label_transport", 0, 30), _mean(logs, "label_transport", 270))
    relative = (cost[0] / spread_before, cost[1] / spread_after)
    line = (f"{name}: transport_cost {cost[0]:.3f} -> {cost[1]:.3f} (first / last 30 of 300), relative to the source "
            f"embeddings' spread {relative[0]:.3f} -> {relative[1]:.3f}, label_transport {labels[0]:.3f} -> "
            f"{labels[1]:.3f}, dtw_offset (last 30) {_mean(logs, 'dtw_offset', 270):.1f} days")
    print(line)
    assert cost[1] < 0.2 * cost[0], line
    assert relative[1] < 0.5 * relative[0], line
    assert labels[1] < labels[0], line
    assert all(log["ot_failures_count"] == 0 for log in logs), line


def test_raincoat_sinkhorn_cost_falls():
    """RAINCOAT (He et al., ICML 2023): the model minimises CE + sinkhorn_weight <pi, C> with
    C_ij = ||z_s,i - z_t,j||^2 over the unit-normalised joint features z = [z^time, z^freq]
    (the entropic plan pi held fixed), plus the reconstruction: the transport cost falls (the
    features are unit-normalised, so not by shrinking), as does the reconstruction error; the
    source stays classified. 200 steps."""
    domains = Series()
    method = _toy_method("raincoat", domains)
    logs, _ = _train(method, domains, 200)
    cost = (_mean(logs, "transport_cost", 0, 20), _mean(logs, "transport_cost", 170))
    rebuilt = (_mean(logs, "reconstruction_loss", 0, 20), _mean(logs, "reconstruction_loss", 170))
    line = (f"raincoat: transport_cost {cost[0]:.4f} -> {cost[1]:.4f} (first 20 / last 30 of 200), "
            f"reconstruction {rebuilt[0]:.3f} -> {rebuilt[1]:.3f}, source_loss (last 30) "
            f"{_mean(logs, 'source_loss', 170):.4f}")
    print(line)
    assert cost[1] < 0.1 * cost[0], line
    assert rebuilt[1] < rebuilt[0], line
    assert _mean(logs, "source_loss", 170) < 0.05, line
    assert math.isclose(_mean(logs, "transported_mass", 0), 1.0, rel_tol=1e-3), line
