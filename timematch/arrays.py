"""Trial arrays: K trials of one method trained in lockstep as one fused model.

A GPU running one trial's step is busy launching about a thousand tiny kernels; several
trials in several processes only take turns (``benchmarks/results/h200-2026-12-04-run2.log``).
Horizontal fusion (HFTA: Wang, Sun, Fang, Pekhimenko, "Horizontally Fused Training Array",
MLSys 2021) trains the K jobs of one model as one: every weight gains a leading member
dimension, so each layer is one batched kernel for all K members. This module owns that.

**How.** The members are K :class:`~timematch.methods.base.Method` objects of one class, built as
for a trial alone: same shapes, one seed, configs that may differ in their numeric values. Their
tensors (the model's and owned modules' parameters and buffers, the method's device state such as
TimeMatch's shift or its pseudo-label counts, the optimiser's moments) are stacked into one
``(K, ...)`` tensor each, and every member's own tensors become views of its slot. A step is the
method's own :meth:`~timematch.methods.base.Method.sample`, ``training_step`` and ``after_step``,
run once under :func:`torch.func.vmap` over the members (``torch.func.grad`` inside, the module
state substituted with :func:`torch.func.functional_call`), so every method and model runs
unchanged; the numeric config values that differ between members are passed in as ``(K,)``
tensors (vmapped: each member reads its own), so one captured CUDA graph serves whatever values
the members take. The optimiser is one functional Adam or SGD over the stacked tensors with
per-member learning rate, weight decay and schedule. Everything outside the steps (shift
estimation, evaluation, checkpoints, logging) runs per member on its own objects, exactly as
alone: a member *is* the trial it would be alone.

Why ``vmap`` rather than hand-stacked layers (HFTA's own route): one code path for the eleven
models' layers and every method's losses, with nothing to keep in step with the single-trial
code; batch norm keeps per-member running statistics under ``vmap`` (its buffers are vmapped
inputs); and the step stays a function of tensors, which is what a CUDA graph captures.

**Randomness.** ``vmap(randomness="same")``: every random draw of a step (batch indices,
augmentation, dropout) is drawn once and shared by the members, which is exactly what each of
them draws alone from the same seed. Members of one array therefore share seed, scenario, fold
and the keys that set shapes or the lockstep (:data:`LOCKSTEP`, and every key that is not a
number); the others may differ.

**Leaving.** A member whose loss goes non-finite, or whose epoch callback raises (a scheduler
stopping it), leaves the array at the end of its epoch: its tensors are copied out of the stack
(so the rest of the array no longer touches them) and its slot is masked; the others go on
untouched (the members are independent under ``vmap``). A slot is not refilled: a newcomer would
not draw the random numbers it draws alone.

Methods that cannot run in arrays (:func:`array_reason`): a step that runs on the host (JUMBOT's
and MAD's solvers) or that steps its optimisers itself.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from timematch.errors import ConfigError
from timematch.execution import Execution
from timematch.step_engine import EpochSums, LearningRate, StepEngine
from timematch.training import EpochCallback, FitResult, Training, build_optimizers, prepare

#: Config keys that set the lockstep of an array: equal in every member.
LOCKSTEP = ("epochs", "steps_per_epoch", "batch_size", "optimizer", "schedule", "nesterov")
#: A method's attributes that are not its device state.
_NOT_STATE = frozenset({"config", "model", "owned", "optimizers", "views", "source", "target", "device"})


def array_reason(method_class: type) -> str | None:
    """Why trials of ``method_class`` cannot share an array (None: they can)."""
    if getattr(method_class, "eager_reason", None):
        return f"its step cannot be fused: {method_class.eager_reason}"
    if getattr(method_class, "manual_optimization", False):
        return "it steps its optimisers itself, inside its step"
    return None


def invariant_keys(config_class: type) -> tuple[str, ...]:
    """The config keys that must be equal in every member of an array: :data:`LOCKSTEP`, and
    every key that is not a real number (a whole number may set a shape or a loop, a flag or a
    choice a branch) unless the config class lists it in ``array_varying``."""
    varying = set(getattr(config_class, "array_varying", ()))
    return tuple(f.name for f in dataclasses.fields(config_class)
                 if f.name in LOCKSTEP or (f.type not in ("float", float) and f.name not in varying))


def array_signature(config: Any) -> tuple:
    """The values of ``config``'s :func:`invariant_keys`: members with equal signatures can share an array."""
    return tuple((key, getattr(config, key)) for key in invariant_keys(type(config)))


def varying_keys(configs: Sequence[Any]) -> tuple[str, ...]:
    """The config keys whose values differ between members. Raises :class:`ConfigError` when a
    key that must be equal in an array (:func:`invariant_keys`) differs."""
    first = configs[0]
    if any(type(c) is not type(first) for c in configs):
        raise ConfigError(f"an array's members have one config class; got {sorted({type(c).__name__ for c in configs})}")
    invariant = set(invariant_keys(type(first)))
    varying = []
    for field in dataclasses.fields(first):
        values = [getattr(c, field.name) for c in configs]
        if all(v == values[0] for v in values):
            continue
        if field.name in invariant:
            raise ConfigError(f"{type(first).__name__}.{field.name} differs between an array's members ({values}); "
                              f"it must be equal in one array (it may set a shape, a loop or a branch, or the "
                              f"lockstep): put members that differ there in different arrays")
        varying.append(field.name)
    return tuple(varying)


# -- the stacked tensors ----------------------------------------------------------------------


class _Holder(nn.Module):
    """A member's modules under one root (``model``, ``owned.<name>``), for ``functional_call``;
    its forward runs a function: the method's step, with the module state substituted."""

    def __init__(self, method: Any) -> None:
        super().__init__()
        self.model = method.model
        self.owned = nn.ModuleDict({name: owned.module for name, owned in method.owned.items()})

    def forward(self, run: Callable[[], Any]) -> Any:
        return run()


def _device_state(method: Any) -> dict[str, tuple[Any, str]]:
    """The method's own device tensors (a shift, pseudo-label counts), one level into the helper
    objects it keeps: name -> (owner object, attribute)."""
    found: dict[str, tuple[Any, str]] = {}

    def walk(owner: Any, prefix: str, depth: int) -> None:
        for name, value in vars(owner).items():
            if (depth == 0 and name in _NOT_STATE) or isinstance(value, nn.Module):
                continue
            if isinstance(value, torch.Tensor):
                found[prefix + name] = (owner, name)
            elif depth == 0 and type(value).__module__.startswith("timematch.methods") and hasattr(value, "__dict__"):
                walk(value, f"{name}.", depth + 1)

    walk(method, "", 0)
    return found


class _Member:
    """Where one member's tensors live: its modules' parameters and buffers by name, its
    device state, its optimisers' state."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.holder = _Holder(method)
        self.parameters = dict(self.holder.named_parameters())
        self.buffers = dict(self.holder.named_buffers())
        self.state = _device_state(method)

    def tensors(self) -> dict[str, torch.Tensor]:
        found = {name: p.detach() for name, p in self.parameters.items()}
        found.update(self.buffers)
        found.update({f"method.{name}": getattr(owner, attr) for name, (owner, attr) in self.state.items()})
        return found

    def bind(self, name: str, value: torch.Tensor) -> None:
        """Make the member's tensor ``name`` be ``value`` (a view of its slot, or its own copy)."""
        if name in self.parameters:
            self.parameters[name].data = value
        elif name in self.buffers:
            module_name, _, leaf = name.rpartition(".")
            self.holder.get_submodule(module_name)._buffers[leaf] = value
            self.buffers[name] = value
        else:
            owner, attr = self.state[name.removeprefix("method.")]
            setattr(owner, attr, value)


@dataclass
class _Group:
    """One optimiser parameter group across the members: its stacked tensors' names, and its
    per-member base learning rate and weight decay, (K,) tensors."""

    names: list[str]
    base_lr: torch.Tensor
    weight_decay: torch.Tensor


class ArrayOptimizer:
    """The members' optimisers as one: Adam (``torch.optim.Adam``'s update, L2 weight decay) or
    SGD (momentum, Nesterov, L2 weight decay) over the stacked parameters, with each member's
    learning rate, weight decay and momentum. Its moments are stacked too, and each member's own
    ``torch.optim`` optimiser holds views of them, so a member's checkpoint is its optimiser's
    ``state_dict()`` as alone."""

    def __init__(self, members: list[_Member], stacked: dict[str, torch.Tensor], rate: LearningRate) -> None:
        self.members = members
        self.stacked = stacked
        self.rate = rate
        first = members[0].method
        self.kind = first.config.optimizer
        self.device = first.device
        by_id = {id(p): name for name, p in members[0].parameters.items()}
        self.groups: list[_Group] = []
        self.slots: list[tuple[str, int, str]] = []  # (optimiser, group index, stacked name)
        for opt_name, optimizer in first.optimizers.items():
            for index, group in enumerate(optimizer.param_groups):
                names = [by_id[id(p)] for p in group["params"]]
                per_member = [m.method.optimizers[opt_name].param_groups[index] for m in members]
                self.groups.append(_Group(
                    names,
                    torch.tensor([float(g["base_lr"]) for g in per_member], dtype=torch.float64, device=self.device),
                    torch.tensor([float(g["weight_decay"]) for g in per_member], dtype=torch.float32, device=self.device),
                ))
                self.slots.extend((opt_name, index, name) for name in names)
        self.trainable = [name for group in self.groups for name in group.names]
        configs = [m.method.config for m in members]
        self.momentum = torch.tensor([c.momentum for c in configs], dtype=torch.float32, device=self.device)
        self.nesterov = first.config.nesterov
        self.step_count = torch.zeros(len(members), dtype=torch.float32, device=self.device)
        self.moments: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.trainable:
            like = torch.zeros_like(stacked[name])
            self.moments[name] = ({"exp_avg": like, "exp_avg_sq": torch.zeros_like(like)} if self.kind == "adam"
                                  else {"momentum_buffer": like})
        for k in range(len(members)):
            self.take_state(k)

    # -- each member's optimiser state as views of the stack --------------------------------

    def take_state(self, k: int) -> None:
        """Copy member ``k``'s optimiser state (empty before its first step, or restored from a
        checkpoint) into its slot and make it views of the slot."""
        member = self.members[k]
        steps = set()
        for opt_name, index, name in self.slots:
            optimizer = member.method.optimizers[opt_name]
            param = member.parameters[name]
            state = optimizer.state[param]
            for key, stacked in self.moments[name].items():
                value = state.get(key)
                stacked[k].copy_(value if value is not None else torch.zeros_like(stacked[k]))
                state[key] = stacked[k]
            if self.kind == "adam":
                steps.add(float(state["step"]) if "step" in state else 0.0)
                state["step"] = self.step_count[k]
        if len(steps) > 1:
            raise ValueError(f"member {k}'s Adam step counts differ between its parameters: {sorted(steps)}")
        self.step_count[k] = steps.pop() if steps else 0.0

    def release_state(self, k: int) -> None:
        """Member ``k`` leaves: its optimiser state becomes its own copy."""
        member = self.members[k]
        for opt_name, _, name in self.slots:
            state = member.method.optimizers[opt_name].state[member.parameters[name]]
            for key in list(state):
                state[key] = state[key].clone()

    def skip(self, names: set[str]) -> None:
        """Leave the tensors ``names`` alone (no gradient reaches them), as ``torch.optim`` does."""
        for group in self.groups:
            group.names = [name for name in group.names if name not in names]

    # -- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], global_step: torch.Tensor) -> None:
        """One update of every member with its gradients ``grads`` (name -> (K, ...))."""
        factor = self.rate.factor(global_step)  # a 0-dim or (K,) tensor, float64
        self.step_count.add_(1.0)
        if self.kind == "adam":
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            steps = self.step_count.to(torch.float64)
            correction1 = 1.0 - beta1 ** steps
            correction2_sqrt = (1.0 - beta2 ** steps).sqrt()
        for group in self.groups:
            lr = (group.base_lr * factor).expand(len(self.members))
            for name in group.names:
                param, g = self.stacked[name], grads[name]
                shape = (-1,) + (1,) * (param.dim() - 1)
                g = g + group.weight_decay.view(shape) * param
                moments = self.moments[name]
                if self.kind == "adam":
                    moments["exp_avg"].lerp_(g, 1.0 - beta1)
                    moments["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    step_size = (lr / correction1).to(param.dtype).view(shape)
                    denom = moments["exp_avg_sq"].sqrt() / correction2_sqrt.to(param.dtype).view(shape) + eps
                    param.sub_(step_size * moments["exp_avg"] / denom)
                else:
                    buffer = moments["momentum_buffer"]
                    buffer.mul_(self.momentum.view(shape)).add_(g)
                    update = g + self.momentum.view(shape) * buffer if self.nesterov else buffer
                    param.sub_(lr.to(param.dtype).view(shape) * update)

    def learning_rate(self, global_step: torch.Tensor) -> list[float]:
        """Each member's last group's learning rate for the next step (a host read: for epoch logs)."""
        factor = self.rate.factor(global_step.cpu())
        return (self.groups[-1].base_lr.cpu() * factor).expand(len(self.members)).tolist()


# -- the fused step -------------------------------------------------------------------------


class ArraySums(EpochSums):
    """Each member's loss and logs over an epoch's steps, summed in ``(K,)`` float64 device
    tensors, and each member's first non-finite loss (global step, -1: none)."""

    def __init__(self, k: int, device: torch.device) -> None:
        super().__init__(device, (k,))

    def read(self) -> list[tuple[dict[str, float], int, float]]:
        """Per member: (sums, first non-finite loss's global step or -1, that loss); then zeroed."""
        keys, packed = self._read()
        return [(dict(zip(keys, row[:-2])), int(row[-2]), row[-1]) for row in zip(*packed)]


class TrialArray(StepEngine):
    """The fused step of K members (see the module docstring): a :class:`StepEngine` whose step
    is the members' steps as one, so it runs eagerly or as one captured CUDA graph the same way."""

    def __init__(self, methods: Sequence[Any], seed: int, execution: Execution = Execution(),
                 log: Callable[[str], None] | None = None, poison: Sequence[int] | None = None) -> None:
        methods = list(methods)
        if not methods:
            raise ValueError("an array needs at least one member")
        cls = type(methods[0])
        if any(type(m) is not cls for m in methods):
            raise ConfigError(f"an array's members are one method; got {sorted({type(m).__name__ for m in methods})}")
        reason = array_reason(cls)
        if reason:
            raise ConfigError(f"{cls.__name__} trials run alone, not in arrays: {reason}")
        self.varying = varying_keys([m.config for m in methods])
        template = methods[0]
        engine = prepare(template, seed, execution, log)  # the template's tiles and views serve every member
        for method in methods:
            method.static_shapes = True  # a vmapped step keeps its shapes (the CPU's selecting path would not)
            if method is not template:
                build_optimizers(method)
                method.views = template.views  # one copy of the data per array
        super().__init__(template, template.optimizers, engine.rate, template.views, engine.steps_per_epoch,
                         engine.context.total_steps, precision=execution.precision, cuda_graph=execution.cuda_graph,
                         log=log)
        if self.path == "cuda_graph":
            self.reason = f"the {len(methods)} members' step is captured once and replayed ({self.views.placement})"
        self.k = len(methods)
        self.members = [_Member(m) for m in methods]
        self.active = [True] * self.k
        self.sums = ArraySums(self.k, self.device)
        self._stack()
        configs = [m.config for m in methods]
        self.hyper = {key: torch.tensor([getattr(c, key) for c in configs], device=self.device,
                                        dtype=torch.float32 if isinstance(getattr(configs[0], key), float) else torch.int64)
                      for key in self.varying}
        rate = engine.rate
        if "lr_gamma" in self.varying or "lr_decay" in self.varying:
            rate = dataclasses.replace(rate, gamma=self.hyper.get("lr_gamma", rate.gamma),
                                       decay=self.hyper.get("lr_decay", rate.decay))
        self.optimizer = ArrayOptimizer(self.members, self.stacked, rate)
        self.trainable = self.optimizer.trainable
        self.optimizer.skip(self.trainable_without_gradient())
        self.poison = None if poison is None else torch.tensor(list(poison), dtype=torch.int64, device=self.device)

    def _stack(self) -> None:
        per_member = [m.tensors() for m in self.members]
        self.stacked: dict[str, torch.Tensor] = {}
        for name, first in per_member[0].items():
            shapes = {tuple(t[name].shape) for t in per_member}
            if len(shapes) > 1:
                raise ConfigError(f"{name} has different shapes in an array's members ({sorted(shapes)}): a key "
                                  f"that sets a size must be equal in one array (they differ in {', '.join(self.varying)})")
            self.stacked[name] = torch.stack([t[name] for t in per_member])
        for k, member in enumerate(self.members):
            for name in self.stacked:
                member.bind(name, self.stacked[name][k])

    def take(self, k: int) -> None:
        """Copy member ``k``'s tensors and optimiser state (restored from a checkpoint) into its
        slot and make them views of it again."""
        member = self.members[k]
        for name, value in member.tensors().items():
            if value.data_ptr() != self.stacked[name][k].data_ptr():
                self.stacked[name][k].copy_(value)
            member.bind(name, self.stacked[name][k])
        self.optimizer.take_state(k)

    def leave(self, k: int) -> None:
        """Member ``k`` leaves the array: its tensors become its own copies; its slot is masked."""
        if not self.active[k]:
            return
        member = self.members[k]
        for name in self.stacked:
            member.bind(name, self.stacked[name][k].clone())
        self.optimizer.release_state(k)
        self.active[k] = False

    # -- one step ----------------------------------------------------------------------------

    def _member_config(self, hyper: dict[str, torch.Tensor]) -> Any:
        """The template's config with the varying keys replaced by this member's (vmapped) values."""
        config = copy.copy(self.members[0].method.config)
        for key, value in hyper.items():
            object.__setattr__(config, key, value)
        return config

    def _substituted(self, state: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor],
                     run: Callable[[], Any]) -> Any:
        """``run()`` with the template's modules, device state and config set to one member's."""
        template = self.members[0]
        method = template.method
        saved_config = method.config
        saved_state = {name: getattr(owner, attr) for name, (owner, attr) in template.state.items()}
        module_state = {}
        try:
            method.config = self._member_config(hyper)
            for name, value in state.items():
                if name.startswith("method."):
                    owner, attr = template.state[name.removeprefix("method.")]
                    setattr(owner, attr, value)
                else:
                    module_state[name] = value
            return functional_call(template.holder, module_state, (run,))
        finally:
            method.config = saved_config
            for name, value in saved_state.items():
                owner, attr = template.state[name]
                setattr(owner, attr, value)

    def trainable_without_gradient(self) -> set[str]:
        """The optimised tensors that the step's loss does not reach (a branch the method does
        not use): alone, their gradient is None and ``torch.optim`` leaves them, weight decay and
        all; ``torch.func.grad`` would give them zeros and the update would decay them. Found once,
        by one plain autograd step of the first member on copies of its state (nothing changes,
        the random stream included)."""
        method = self.method
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = {name: t[0].clone() for name, t in self.stacked.items()}
            inputs = [state[name].requires_grad_(True) for name in self.trainable]

            def run():
                return method.training_step(method.sample(), self.context)

            loss, _ = self._substituted(state, {k: v[0] for k, v in self.hyper.items()}, run)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return {name for name, g in zip(self.trainable, grads) if g is None}

    def _step_body(self, batches: Any) -> list[str]:
        method = self.method
        context = self.context
        trainable = {name: self.stacked[name] for name in self.trainable}
        others = {name: t for name, t in self.stacked.items() if name not in trainable}

        def member_loss(trainable, others, hyper, batches):
            def run():
                drawn = method.sample() if batches is None else batches
                loss, logs = method.training_step(drawn, context)
                return loss, logs
            loss, logs = self._substituted({**trainable, **others}, hyper, run)
            logs = {k: v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=self.device)
                    for k, v in logs.items()}
            return loss, (loss.detach(), logs)

        def member_after(others, hyper):
            self._substituted(others, hyper, lambda: method.after_step(context))
            return ()

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                            cache_enabled=False):
            grads, (loss, logs) = vmap(grad(member_loss, has_aux=True), in_dims=(0, 0, 0, None),
                                       randomness="same")(trainable, others, self.hyper, batches)
        if self.poison is not None:  # fault injection, per member (tests)
            loss = loss * torch.where(self.global_step == self.poison, float("nan"), 1.0)
        self.sums.add(loss, logs, self.global_step)
        self.optimizer.step(grads, self.global_step)
        vmap(member_after, in_dims=(0, 0), randomness="same")(self.stacked, self.hyper)
        self.global_step.add_(1)
        return []

    def _set_learning_rates(self) -> None:  # the array's optimiser reads the schedule itself
        pass

    def learning_rates(self) -> list[float]:
        return self.optimizer.learning_rate(self.global_step)


# -- training an array ----------------------------------------------------------------------


@dataclass
class MemberOutcome:
    """What one member's training gave: its :class:`FitResult`, or the exception that ended it
    (a non-finite loss, a callback that stopped it), and the epoch it left at."""

    result: FitResult | None = None
    error: BaseException | None = None
    left_at: int = 0


def fit_array(methods: Sequence[Any], seed: int, on_epoch: Sequence[EpochCallback | None] | None = None,
              log: Callable[[str], None] | None = None, execution: Execution = Execution(),
              measure: Sequence[Callable[[], dict[str, float]] | None] | None = None,
              resume_states: Sequence[Any] | None = None,
              poison: Sequence[int] | None = None) -> list[MemberOutcome]:
    """Train ``methods`` (one method class, one seed; configs as :func:`varying_keys` allows) as
    one array: each member's epochs, reports, best epoch, callbacks and checkpoints are those of
    :func:`timematch.training.fit` alone; only the steps are fused. ``on_epoch[k]``,
    ``measure[k]``, ``resume_states[k]``: member ``k``'s (all resume states at one epoch).
    A member whose loss goes non-finite, or whose callback raises, leaves (its outcome holds the
    exception); the others go on."""
    k = len(methods)
    array = TrialArray(methods, seed, execution, log, poison)
    trainings = [Training(m, seed, array.views, None, None if measure is None else measure[i])
                 for i, m in enumerate(methods)]
    outcomes = [MemberOutcome() for _ in range(k)]
    if resume_states is not None:
        epochs = {s.epoch for s in resume_states if s is not None}
        if len(epochs) > 1 or (epochs and any(s is None for s in resume_states)):
            raise ConfigError(f"an array resumes all its members from one epoch; their checkpoints hold {sorted(epochs)}")
        for i, state in enumerate(resume_states):
            if state is not None:
                shared = _rng_state(array.device)
                trainings[i].resume(state)
                array.take(i)
                if i > 0:
                    _set_rng_state(array.device, shared)  # the members share one stream: the first's
    array.set_step(trainings[0].start_step)
    for epoch in trainings[0].epochs():
        begun = _each_member(array, outcomes, epoch, lambda i: trainings[i].begin_epoch(epoch))
        array.method.set_train_mode()  # the fused step runs the first member's modules, whether or not it left
        started = time.perf_counter()
        per_member = array.run_epoch(trainings[0].steps)
        elapsed = time.perf_counter() - started
        rates = array.learning_rates()

        def finish(i: int) -> None:
            sums, first_bad, bad_loss = per_member[i]
            trainings[i].check_finite(epoch, first_bad, bad_loss)
            report = trainings[i].finish_epoch(epoch, *begun[i], sums, elapsed, 0.0, rates[i])
            if on_epoch is not None and on_epoch[i] is not None:
                on_epoch[i](report, trainings[i].state_capture(epoch))

        _each_member(array, outcomes, epoch, finish)
        if log:
            log(f"array epoch {epoch}: {sum(array.active)} of {k} members active, "
                f"{trainings[0].steps * k / max(elapsed, 1e-9):.1f} member-steps/s")
        if not any(array.active):
            break
    for i in _active(array):
        array.leave(i)
        outcomes[i].result = trainings[i].result(array.path, array.reason, execution.precision)
        outcomes[i].left_at = trainings[i].method.config.epochs
    return outcomes


def _active(array: TrialArray) -> list[int]:
    return [i for i, on in enumerate(array.active) if on]


def _each_member(array: TrialArray, outcomes: list[MemberOutcome], epoch: int,
                 run: Callable[[int], Any]) -> dict[int, Any]:
    """``run(i)`` for each active member, outside the fused steps (an epoch's start or end).
    Alone, a member's hooks draw from the stream its steps draw from; in an array the members
    share that stream, so each member's hooks start from the same state and the first one's end
    state is the one the steps continue from (the hooks draw alike: same shapes, same seed). An
    exception ends that member alone: it leaves the array, its outcome holds the exception."""
    start, after, out = _rng_state(array.device), None, {}
    for i in _active(array):
        _set_rng_state(array.device, start)
        try:
            out[i] = run(i)
        except Exception as error:  # noqa: BLE001 - the member's outcome holds it; the others go on
            outcomes[i].error, outcomes[i].left_at = error, epoch
            array.leave(i)
        if after is None:
            after = _rng_state(array.device)
    _set_rng_state(array.device, after if after is not None else start)
    return out


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
