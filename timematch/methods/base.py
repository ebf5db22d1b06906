"""The contract every method follows, and the settings every method shares.

A method declares four things and the shared loop (:func:`timematch.training.fit`) does
the rest (batches, devices, train/eval modes, optimiser and schedule steps, checkpoints,
evaluation):

- its **config**: a frozen dataclass (``config_class``) with the published defaults;
- the **modules it owns** beyond the classifier (a discriminator, a teacher), declared
  once with :meth:`Method.own`: the loop moves them to the device, sets their train/eval
  mode, and checkpoints and restores them with the model;
- its **parameter groups** (:meth:`Method.parameter_groups`; by default the backbone at
  ``backbone_lr_scale`` times the head's learning rate), and through the config the
  optimiser (``adam``, ``sgd``) and schedule (``cosine``, ``inverse_decay``, ``constant``);
- one **training step**: given the batches of :meth:`Method.sample` (built by
  ``self.views``, see :mod:`timematch.data.views`) and a
  :class:`~timematch.step_engine.StepContext` (the global step as a device tensor, steps
  per epoch, total steps), :meth:`Method.training_step` returns the loss and a dict of
  logs, **as tensors** (averaged over the epoch; keys ending in ``_count`` summed).

A step reads the model through :func:`~timematch.data.views.model_outputs` (logits and the
pooled features) or, when it needs what came before temporal pooling, through
:meth:`Method.date_outputs`: the same forward pass, which also returns the **per-date
embeddings** ``(B, T, 128)`` (the pixel-set encoder's output for each date, independent of
the date positions, the same for every temporal encoder) and their **positions** ``(B, T)``
in days (:class:`~timematch.models.classifier.DateOutputs`). Methods that align time axes
(MAD, C-MAD, RAINCOAT) use it; batches of ``strong(..., shared_dates=True)`` views share one
time axis per batch.

A method that adds a module to the classifier's own forward pass (RAINCOAT's frequency
branch), rather than owning it beside the classifier, attaches it in :meth:`Method.extend_model`
(:meth:`~timematch.models.TimeSeriesClassifier.attach_extension`); the constructor calls it, and
a saved model is rebuilt with it (:func:`timematch.serving.rebuild_model`).

On a GPU the sampling and the step are captured once as a CUDA graph and replayed
(:mod:`timematch.step_engine`), so both follow three rules: tensor operations with static
shapes (when ``self.static_shapes``, mask, do not select: ``sample_weight`` in the model's
forward leaves samples out of the batch statistics); nothing read back to the host (no
``float(tensor)``, ``.item()``, ``if tensor:``); anything that changes between steps or
epochs and is read inside the step (a shift, a coefficient) lives in a tensor updated in
place, because a Python number is frozen at capture. Per-epoch statistics accumulate in
device tensors that :meth:`end_epoch` reads. A method that cannot follow them says why in
``eager_reason`` and runs eagerly.

Methods that update with more than one optimiser per step set ``manual_optimization``,
name their optimisers in :meth:`Method.optimizer_groups`, and call
:meth:`Method.step_optimizer` themselves; the loop then only sets the learning rates.

What the runner and the report need to know about a method are class attributes:
``table_order`` (its row in the paper's table), ``short_name`` (in run names),
``reference`` (a reference row, never marked best), ``evaluates_source_model`` (its
default trial evaluates the pretrained source model: the source-only baseline),
``starts_from_source``, ``trains_on`` (which tile's labelled data its training reads: a
training that reads the source alone is trained once per source tile and evaluated in every
scenario of that tile), ``select_best_by`` and ``eager_reason``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from timematch.data.dataset import Domain
from timematch.data.views import Batch, Views, date_outputs
from timematch.checks import check_choice, check_flag, check_range
from timematch.errors import ConfigError
from timematch.training import StepContext

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "inverse_decay", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Settings every method shares. ``steps_per_epoch=None`` means one pass over the
    labelled training parcels.

    The optimiser: ``adam`` (with ``weight_decay``) or ``sgd`` (``momentum``, ``nesterov``);
    the schedule over all steps: ``cosine`` (annealing to 0), ``inverse_decay``
    (lr * (1 + lr_gamma * i)^-lr_decay, the adversarial methods' published schedule) or
    ``constant``. The backbone (pixel-set and temporal encoders) learns at
    ``backbone_lr_scale`` times ``lr``; the head (decoder) and the method's own trainable
    modules at ``lr``.
    """

    epochs: int = 20
    steps_per_epoch: int | None = 500
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    focal_gamma: float = 1.0
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"
    lr_gamma: float = 0.001
    lr_decay: float = 0.75
    backbone_lr_scale: float = 1.0

    #: Settings that count steps of a step-based schedule (the reversal's warm-up): see :meth:`scaled_to`.
    step_counts: ClassVar[tuple[str, ...]] = ()
    #: Whole-number settings that may differ between the members of an array of trials
    #: (:mod:`timematch.arrays`): the step reads them only as tensors, or they are read outside
    #: the step. Every other whole number, flag and choice may set a shape or a loop and is
    #: equal inside an array (:func:`timematch.arrays.invariant_keys`); real numbers may differ.
    array_varying: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_range(self, "epochs", 0, 100_000)
        check_range(self, "steps_per_epoch", 1, 10_000_000)
        check_range(self, "batch_size", 2, 65_536)
        check_range(self, "lr", 0.0, 10.0, low_open=True)
        check_range(self, "weight_decay", 0.0, 1.0)
        check_range(self, "focal_gamma", 0.0, 10.0)
        check_choice(self, "optimizer", OPTIMIZERS)
        check_range(self, "momentum", 0.0, 1.0, high_open=True)
        check_choice(self, "schedule", SCHEDULES)
        check_range(self, "lr_gamma", 0.0, 1.0)
        check_range(self, "lr_decay", 0.0, 10.0)
        check_range(self, "backbone_lr_scale", 0.0, 10.0)
        check_flag(self, "nesterov")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise ConfigError(f"{type(self).__name__}: nesterov=True needs momentum > 0 (got {self.momentum})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scaled_to(self, steps: int) -> dict[str, Any]:
        """The step-based schedule settings that give a training of ``steps`` steps the schedule's
        shape over this config's own budget (``epochs x steps_per_epoch``): the inverse decay's
        ``lr_gamma`` times ``own / steps``, each :attr:`step_counts` setting times ``steps / own``
        (at least 1). Cosine schedules scale by themselves: nothing to set. How the quick profile
        compresses the published 10,000 steps to 100, and ``benchmarks/budget.py`` to any budget."""
        if self.steps_per_epoch is None:
            raise ValueError(f"{type(self).__name__}: a budget in steps needs steps_per_epoch")
        factor = steps / (self.epochs * self.steps_per_epoch)
        scaled: dict[str, Any] = {}
        if self.schedule == "inverse_decay":
            scaled["lr_gamma"] = self.lr_gamma / factor
        for name in self.step_counts:
            scaled[name] = max(1, round(getattr(self, name) * factor))
        return scaled


@dataclass(frozen=True)
class MethodInfo:
    """What a method's training found, kept with the experiment's result: for a shift-estimating
    method (TimeMatch) every estimation's scores (``ShiftScores.to_dict()``: ``shifts``,
    ``scores``, ``estimator``, ``estimate``) and the shift it trained with, in days."""

    shift_scores: tuple[dict[str, Any], ...] = ()
    estimated_shift: int | None = None


@dataclass
class OwnedModule:
    """A module a method owns beyond the classifier; ``trainable`` ones are in train mode
    during the epoch and in the optimiser's head group, the others (an EMA teacher) stay
    in eval mode and are updated by the method itself."""

    module: nn.Module
    trainable: bool


class Method:
    """Base class of the methods. Subclasses set ``config_class`` and override
    :meth:`sample` and :meth:`training_step`, and the hooks they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    #: Starts from the source model (False: trains from scratch, e.g. the upper bound).
    starts_from_source: ClassVar[bool] = True
    #: Epoch metric whose best epoch's weights are kept (None: keep the last epoch).
    select_best_by: ClassVar[str | None] = None
    #: Row of the method in the results table (the paper's order: baselines first, the
    #: competitors, FixMatch, TimeMatch, the upper bound last).
    table_order: ClassVar[float] = 50.0
    #: At most 6 characters, as MLflow run names show the method (``DK-FR1 TM f0#3``): the
    #: runs table's name column shows about 15 characters before it truncates.
    short_name: ClassVar[str]
    #: A row of the TimeMatch paper's table (False: a method published since; ``--method paper``
    #: runs the paper's rows alone).
    in_paper_table: ClassVar[bool] = True
    #: A reference row (source-only, upper bound): shown, never marked best (never bold; in MLflow
    #: its trials are tagged ``reference=true``, never ``best=true``, and its model's alias is ``reference``).
    reference: ClassVar[bool] = False
    #: Its training is the source models' training, and its default trial only evaluates the
    #: pretrained source model on the target (the source-only baseline). Exactly one method.
    evaluates_source_model: ClassVar[bool] = False
    #: Which tile's data its training reads: ``"source"`` (labelled source only: the source
    #: models, shift augmentation), ``"target"`` (the upper bound) or ``"both"`` (adaptation).
    #: A training from scratch that reads the source alone does not depend on the target, so
    #: the runner trains it once per source tile and evaluates it in each of the tile's
    #: scenarios (:meth:`trained_on_source_alone`). The class list and the band statistics
    #: always come from the source tile, so a target-only training still depends on both.
    trains_on: ClassVar[str] = "both"
    #: The method calls :meth:`step_optimizer` itself (several optimisers per step).
    manual_optimization: ClassVar[bool] = False
    #: Why its step cannot be captured as a CUDA graph (None: it can); it then runs eagerly,
    #: and the reason is logged and tagged on its MLflow run.
    eager_reason: ClassVar[str | None] = None

    @classmethod
    def trained_on_source_alone(cls) -> bool:
        """Its training reads only the labelled source tile and starts from scratch: one
        training per source tile serves every target (it is a source model, trained as the
        source-model method trains with this method's config; see
        :func:`timematch.experiment.source_training`)."""
        return cls.trains_on == "source" and not cls.starts_from_source

    def __init__(self, config: TrainConfig, model: nn.Module, source: Domain, target: Domain,
                 device: torch.device) -> None:
        self.config = config
        self.model = model
        self.source = source
        self.target = target
        self.device = device
        self.owned: dict[str, OwnedModule] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # set by the loop
        self.views: Views | None = None  # set by the loop: where this trial's batches are built
        #: The step keeps its shapes and reads nothing back (on a GPU, where it is captured as a
        #: CUDA graph); on a CPU a method may select samples and skip work instead.
        self.static_shapes = device.type == "cuda"
        self.extend_model(model, config)

    # -- declared by the method ----------------------------------------------------------

    @classmethod
    def extend_model(cls, model: nn.Module, config: TrainConfig) -> None:
        """Attach to ``model`` the modules this method adds to its forward pass, each with
        ``model.attach_extension(cls.name, module, options)``, ``options`` being keys of ``config``
        that build it again: :func:`timematch.serving.rebuild_model` calls this with the config
        of those keys to rebuild a saved model. Called by the constructor, so on a model that
        may have them already (leave it as it is). None by default."""

    def own(self, name: str, module: nn.Module, trainable: bool = True) -> nn.Module:
        """Declare a module the method owns: moved to the device here, put in train/eval mode,
        optimised (when ``trainable``), checkpointed and restored by the loop."""
        if name in self.owned or name == "model":
            raise ValueError(f"{type(self).__name__} owns a module named {name!r} already")
        module = module.to(self.device)
        self.owned[name] = OwnedModule(module, trainable)
        return module

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups ``{"name", "params", "lr_scale"}`` of the single optimiser: the
        backbone (everything but the decoder) at ``backbone_lr_scale``, the head (decoder and
        the trainable owned modules) at 1."""
        decoder = getattr(self.model, "decoder", None)
        head_ids = {id(p) for p in decoder.parameters()} if decoder is not None else set()
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids and p.requires_grad]
        head = [p for p in self.model.parameters() if id(p) in head_ids and p.requires_grad]
        for owned in self.owned.values():
            if owned.trainable:
                head.extend(p for p in owned.module.parameters() if p.requires_grad)
        groups = [{"name": "backbone", "params": backbone, "lr_scale": self.config.backbone_lr_scale},
                  {"name": "head", "params": head, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]]

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        """Optimiser name -> its parameter groups. One optimiser unless ``manual_optimization``."""
        return {"main": self.parameter_groups()}

    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        return max(1, len(self.source.labelled("train")) // self.config.batch_size)

    def date_outputs(self, batch: Batch, sample_weight: torch.Tensor | None = None):
        """The model's forward pass on ``batch`` with the per-date embeddings before temporal
        pooling and their positions: :class:`~timematch.models.classifier.DateOutputs`
        (``logits``, ``features``, ``dates (B, T, 128)``, ``positions (B, T)``)."""
        return date_outputs(self.model, batch, sample_weight)

    def sample(self) -> dict[str, Batch]:
        """The batches of one step, built by ``self.views`` (tensor operations: inside the
        captured step on a GPU, in a background thread on a CPU)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Batch],
                      context: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one step and its logs, tensors (averaged over the epoch; keys ending in
        ``_count`` summed)."""
        raise NotImplementedError

    def max_date_shift(self) -> int:
        """The most days the method moves date positions by (augmentation, shift correction):
        the loop checks once that the tiles' dates moved that far stay encodable."""
        return 0

    def check_date_range(self) -> None:
        """Raise :class:`ConfigError` unless every date the method can feed the model, its
        tiles' positions moved by up to :meth:`max_date_shift` days, lies in the model's
        table. Checked once, where batches are built: the forward does not check."""
        shift = self.max_date_shift()
        for domain in {id(d.packed): d for d in (self.source, self.target)}.values():
            positions = domain.packed.positions
            if len(positions) == 0:
                continue
            try:
                self.model.check_positions((int(positions.min()) - shift, int(positions.max()) + shift))
            except ValueError as error:
                raise ConfigError(f"{type(self).__name__} on {domain.tile} (dates moved by up to {shift} days): "
                                  f"{error}") from None

    # -- hooks ---------------------------------------------------------------------------

    def start_epoch(self, epoch: int, rng: np.random.Generator, logs: list[str]) -> dict[str, float]:
        return {}

    def after_step(self, context: StepContext) -> None:
        """Called after each optimiser step (e.g. to update an EMA teacher)."""

    def end_epoch(self, epoch: int, logs: list[str]) -> dict[str, float]:
        return {}

    def eval_model(self) -> nn.Module:
        """The model evaluated each epoch and returned at the end."""
        return self.model

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the model, the owned modules and the optimisers, for checkpoints
        (plain values and tensors only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def info(self) -> MethodInfo:
        """Method outputs worth keeping with the result (a shift-estimating method's scores)."""
        return MethodInfo()

    # -- used by the loop and by manual-optimisation methods -----------------------------

    def set_train_mode(self) -> None:
        self.model.train()
        for owned in self.owned.values():
            owned.module.train(owned.trainable)

    def step_optimizer(self, name: str, loss: torch.Tensor, context: StepContext) -> None:
        """Manual optimisation: zero, backward and step optimiser ``name`` (the loop checks that
        the loss ``training_step`` returns is finite)."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
