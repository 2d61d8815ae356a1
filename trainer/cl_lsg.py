"""cl-lsg: continual learning with learnable sparse growth (Yang, Lin, Zhang & Fan, 2022).

Representation. The architecture spec is the *full-width* network, the capacity growth may use; the
backbone holds every weight of it, zero (stored as -0.0, see `create_backbone`) where nothing has
been kept yet. A *unit* is an output unit of a hidden layer (a channel of a convolution), a
*kernel* the weights between two units: one weight W[o, i] of a Linear layer, the [kh, kw] slice
W[o, i] of a Conv2d; masks are kernel-wise, over [out, in] pairs. Networks: plain chains of
bias-free Linear / Conv2d layers with ReLU and pooling between them and a flatten only before the
output layer (mlp, lenet300-100, cnn and vgg with bn 'none'). The *seed network* is the first
`seed_fraction` of each hidden layer's units.

Per task t, with F = the kernels some published task uses (frozen: their values never change again)
and G = the units grown so far (the seed network before task 0):

1. Holdout: `val_fraction` of the training set is kept apart; every accuracy that decides growth is
   measured on it, with the task's network exactly as it will be served.
2. Target: `target` if given, else the holdout accuracy of the full-width network trained from
   scratch on the rest of the task (plain SGD, `scratch_epochs`; its test accuracy is recorded as
   `scratch_accuracy`, the from-scratch reference of bench/cl_lsg.py).
3. Pick and reuse (`epochs`): over the kernels between units of G, a *selective mask* on the frozen
   kernels (their values fixed), binarised with a Gumbel-sigmoid relaxation: hard threshold at 0.5
   in the forward, the sigmoid's gradient in the backward (straight-through); every other kernel
   between units of G is *released* (kept by no task) and retrained from a fresh initialisation,
   behind a kernel-wise *attentive mask* (continuous sparsification: sigmoid(beta * s), beta raised
   geometrically from 1 to `beta_max` over the phase, L1 penalty `penalty`; binarised s > 0).
   A fresh per-task head (the output layer) trains beside them.
4. Grow, only if the holdout accuracy is below the target (`grow_epochs`, continuing from step 3):
   the next `grow_fraction` of each hidden layer's ungrown units become candidates with a
   channel-wise *grown mask* (the same continuous sparsification and penalty) that multiplies
   their incoming kernels, which carry attentive masks like released ones; the kernels between
   candidates and every other unit join the trainable set. Units whose grown mask ends at 0 are
   not grown.
5. The task keeps the kernels its binary masks select, minus those of units that can no longer
   matter (no incoming kernel, or no outgoing one): `growth_masks` 'LAYER.kernels'. The grown or
   seed units it keeps are its 'LAYER.channels' (seed units task 0 leaves unused are not grown:
   a later task may grow them). The next backbone version is the
   previous one with only the kernels this task newly keeps written in, so it is stored as a sparse
   delta of exactly the weights the task added, and every kernel a published task reads is never
   written again: old tasks are bit-exact. Kernels trained but not kept stay zero (released).

Everything a later task needs (F and G) is the union of the published tasks' growth masks; there
is no training state. All randomness (holdout split, initialisations, batch order, Gumbel noise)
comes from the task's generator. Metrics per task: `below_target` and `grew` (the growth phase ran:
below the target with candidates left), `reuse_accuracy`, `validation_accuracy` (after growth, if
any), `target`, `scratch_accuracy`, units grown per layer, kernels reused / newly kept, and
`model_size`: the weights some task uses (the backbone's kept kernels plus every task's head
entries) over the weights of one full-width network; `grown_size`: the same for the whole grown
architecture (every kernel between grown units, kept or released).

Defaults differ from the paper's (SGD 0.01 for weights, Adam 5e-4 for masks, 50 epochs, batch 32):
the offline streams have a few hundred examples per task, so the masks use Adam at `mask_lr`
0.01 for 20 epochs per phase; everything else is as in the paper.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from registry import effective_parameters, forward, maskable_parameters
from registry.errors import MaskbankError
from registry.materialize_cl_lsg import METHOD, kernel_masked, layer_of

from .fit import fit
from .methods import Method, PublishedTask, TaskArtifact, TrainingContext, register_method, require
from .packnet import filter_layers
from .streams import TaskData

Tensors = dict[str, torch.Tensor]


@dataclass
class CLLSGConfig:
    target: float | None = None  # accuracy to reach before growing; None: a from-scratch model's (above 1: always grow)
    epochs: int = 20  # pick-and-reuse epochs
    grow_epochs: int = 20  # growth epochs (only for tasks below the target)
    scratch_epochs: int = 20  # the from-scratch target model's epochs (unused when target is given)
    lr: float = 0.01  # SGD for weights and the head (the paper's)
    momentum: float = 0.9
    mask_lr: float = 0.01  # Adam for the selective, attentive and grown masks' scores
    batch_size: int = 32
    seed_fraction: float = 0.125  # share of each hidden layer's units in the seed network
    grow_fraction: float = 0.125  # share of each hidden layer's units offered as growth candidates per task
    penalty: float = 1e-4  # L1 weight of the attentive and grown masks (the paper's lambda)
    gumbel_temperature: float = 1.0  # of the selective mask's Gumbel-sigmoid (its gradient only)
    selective_init: float = 3.0  # initial selective scores: sigmoid(3) = 95% of old kernels picked at first
    attentive_init: float = 0.1  # initial attentive and grown scores (positive: kept unless pushed down)
    beta_max: float = 200.0  # final slope of the continuous sparsification sigmoid in each phase
    val_fraction: float = 0.2  # share of the training set held out for the growth decision
    INERT: ClassVar[dict] = {"scratch_epochs": [("target", lambda target: target is not None,
                                                 "the target is given, so no from-scratch model is trained")]}

    def __post_init__(self):
        if self.target is not None and not self.target >= 0:  # NaN too
            raise ValueError(f"target must be >= 0 (an accuracy; above 1 always grows), got {self.target}")
        require(self, "in (0, 1]", "seed_fraction", "grow_fraction")
        require(self, "in (0, 1)", "val_fraction")
        require(self, ">= 1", "epochs", "grow_epochs", "scratch_epochs", "batch_size", "beta_max")
        require(self, "> 0", "lr", "mask_lr", "gumbel_temperature")
        require(self, "in [0, 1)", "momentum")
        require(self, ">= 0", "penalty")


def network_layers(module: nn.Module) -> list[str]:
    """The weight names of `module`'s layers in order (the last one is the head); raises MaskbankError
    unless it is a chain of bias-free Linear / Conv2d layers whose only flatten is before the head."""
    layers = filter_layers(module, METHOD)
    if any(layer.repeat != 1 for layer in layers[:-1]):
        raise MaskbankError(f"{METHOD} grows hidden layers unit by unit; only the output layer may follow a flatten, "
                            f"got layers {[(layer.name, layer.repeat) for layer in layers]} (name, inputs per unit)")
    return [layer.name for layer in layers]


def per_kernel(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An [out, in] mask viewed so that it broadcasts over `weight`'s kernel dimensions."""
    return mask.view(*mask.shape, *(1,) * (weight.dim() - 2))


def _history(tasks: list[PublishedTask], backbone: Tensors, hidden: list[str]) -> tuple[Tensors, Tensors]:
    """(F, G): per hidden layer, the kernels some published task uses and the units grown so far."""
    frozen = {n: torch.zeros(backbone[n].shape[:2], dtype=torch.bool) for n in hidden}
    grown = {n: torch.zeros(backbone[n].shape[0], dtype=torch.bool) for n in hidden}
    for task in tasks:
        if "growth_masks" not in task.parts:
            raise MaskbankError(f"task {task.id} ({task.name}) has no growth_masks; cl-lsg can only extend its own tasks")
        masks = task.parts["growth_masks"]
        for n in hidden:
            frozen[n] |= masks[f"{layer_of(n)}.kernels"]
            grown[n] |= masks[f"{layer_of(n)}.channels"]
    return frozen, grown


def next_units(grown: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first ceil(fraction * width) units not in `grown` (fewer when the layer is nearly full)."""
    free = (~grown).nonzero().flatten()[: math.ceil(fraction * grown.numel())]
    result = torch.zeros_like(grown)
    result[free] = True
    return result


def prune_dead(kernels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop the kernels of units that cannot affect the output: those fed by a unit with no incoming
    kernel (it outputs 0), and those of a unit no kernel of the next layer reads. `kernels` are the
    hidden layers' bool [out, in] masks in order; the head reads every unit of the last one."""
    kept = [k.clone() for k in kernels]
    alive = torch.ones(kept[0].shape[1], dtype=torch.bool)
    for k in kept:
        k &= alive[None, :]
        alive = k.any(1)
    read = torch.ones(kept[-1].shape[0], dtype=torch.bool)
    for k in reversed(kept):
        k &= read[:, None]
        read = k.any(0)
    return kept


def gumbel_hard(scores: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Binary sample of a Gumbel-sigmoid (logistic noise from `generator`): 1 where
    sigmoid((scores + noise) / temperature) > 0.5, with that sigmoid's gradient (straight-through)."""
    u = torch.rand(scores.shape, generator=generator).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((scores + u.log() - (-u).log1p()) / temperature)
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())  # exactly 0 or 1 forward: the bracket is 0


class GrowthMask(nn.Module):
    """Parametrization W -> the weight task t trains through: frozen kernels at their old values
    behind the selective mask, every other available kernel as W behind the attentive mask, and the
    rows of candidate units also behind their grown mask. In eval mode every mask is binary."""

    def __init__(self, old: torch.Tensor, frozen: torch.Tensor, config: CLLSGConfig, generator: torch.Generator):
        super().__init__()
        out = old.shape[0]
        self.register_buffer("old", old.clone())
        self.register_buffer("frozen", frozen.clone())
        self.register_buffer("available", torch.zeros_like(frozen))
        self.register_buffer("candidates", torch.zeros(out, dtype=torch.bool))
        self.selective = nn.Parameter(torch.full(frozen.shape, config.selective_init))
        self.attentive = nn.Parameter(torch.full(frozen.shape, config.attentive_init))
        self.grown = nn.Parameter(torch.full((out,), config.attentive_init))
        self.temperature, self.generator, self.beta = config.gumbel_temperature, generator, 1.0

    def _relaxed(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.beta * scores) if self.training else (scores > 0).to(scores.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        selective = gumbel_hard(self.selective, self.temperature, self.generator) if self.training else \
            (self.selective > 0).to(weight.dtype)
        rows = torch.where(self.candidates, self._relaxed(self.grown), torch.ones_like(self.grown))
        trainable = (self.available & ~self.frozen).to(weight.dtype) * self._relaxed(self.attentive) * rows[:, None]
        return torch.where(per_kernel(self.frozen, weight), kernel_masked(self.old, selective), kernel_masked(weight, trainable))

    def penalty(self) -> torch.Tensor:
        """Sum of the relaxed attentive masks of the trainable kernels and grown masks of the candidates."""
        trainable = self.available & ~self.frozen
        return torch.sigmoid(self.beta * self.attentive)[trainable].sum() + torch.sigmoid(self.beta * self.grown)[self.candidates].sum()

    def kept(self) -> torch.Tensor:
        """bool [out, in]: the kernels the binary masks select."""
        rows = ~self.candidates | (self.grown > 0)
        return (self.frozen & (self.selective > 0)) | (self.available & ~self.frozen & (self.attentive > 0) & rows[:, None])


class MaskSteps:
    """The mask half of a training step, run through fit's hooks: add the L1 penalty's gradient
    before the weights' step, then step Adam on the scores; the continuous masks' slope beta rises
    geometrically from 1 (first epoch) to `beta_max` (last epoch)."""

    def __init__(self, masks: dict[str, GrowthMask], config: CLLSGConfig, epochs: int, batches_per_epoch: int):
        self.masks, self.config, self.epochs, self.batches = list(masks.values()), config, epochs, batches_per_epoch
        self.scores = [s for m in self.masks for s in (m.selective, m.attentive, m.grown)]
        self.adam = torch.optim.Adam(self.scores, lr=config.mask_lr)
        self.step = 0
        self._set_beta()

    def _set_beta(self) -> None:
        epoch = min(self.step // self.batches, self.epochs - 1)
        for mask in self.masks:
            mask.beta = self.config.beta_max ** (epoch / max(1, self.epochs - 1))

    def before_step(self) -> None:
        (self.config.penalty * sum(m.penalty() for m in self.masks)).backward()

    def after_step(self) -> None:
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.step += 1
        self._set_beta()


@dataclass
class _Outcome:
    """A candidate result of learning the task: its artifact pieces and holdout accuracy."""

    kernels: list[torch.Tensor]
    backbone: Tensors
    head: Tensors
    accuracy: float


@register_method
class CLLSG(Method):
    """Pick-and-reuse over frozen kernels, and learnable sparse growth below a target accuracy."""

    name = METHOD
    backbone_codec = "signed-constant/v1"  # version 1 is all zeros: one bit per weight
    Config = CLLSGConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        """All zeros: nothing grown yet. -0.0, because that is what signed-constant/v1 decodes a zero
        layer to, so a model read back from the registry equals the one in memory bit for bit."""
        network_layers(module)
        return {name: -torch.zeros_like(module.get_parameter(name)) for name in maskable_parameters(module)}

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext) -> TaskArtifact:
        cfg = self.config
        names = network_layers(module)
        hidden = names[:-1]
        frozen, grown = _history(context.tasks, context.backbone, hidden)
        if not context.tasks:
            grown = {n: next_units(g, cfg.seed_fraction) for n, g in grown.items()}
        train_part, holdout = self._holdout(task, generator)
        plain = copy.deepcopy(module)
        target, scratch = (cfg.target, None) if cfg.target is not None else self._scratch(plain, train_part, holdout, task, generator)
        masks = self._attach(module, context.backbone, frozen, grown, generator)
        self._make_available(masks, hidden, grown, {n: torch.zeros_like(g) for n, g in grown.items()})
        self._train(module, masks, train_part, cfg.epochs, generator, f"task {task.index} ({task.name}) reuse")
        outcome = self._outcome(module, plain, masks, names, context.backbone, frozen, holdout, task)
        reuse_accuracy, candidates = outcome.accuracy, {n: next_units(g, cfg.grow_fraction) for n, g in grown.items()}
        grow = reuse_accuracy < target and any(c.any() for c in candidates.values())
        if grow:
            self._make_available(masks, hidden, {n: grown[n] | candidates[n] for n in hidden}, candidates)
            self._train(module, masks, train_part, cfg.grow_epochs, generator, f"task {task.index} ({task.name}) grow")
            outcome = self._outcome(module, plain, masks, names, context.backbone, frozen, holdout, task)
        new = candidates if grow else {n: torch.zeros_like(g) for n, g in grown.items()}
        if not context.tasks:  # the seed network is task 0's growth; nothing is recorded as grown before it
            new, grown = {n: new[n] | grown[n] for n in hidden}, {n: torch.zeros_like(g) for n, g in grown.items()}
        decision = {"below_target": reuse_accuracy < target, "grew": grow, "reuse_accuracy": reuse_accuracy,
                    "target": target, "target_source": "option" if cfg.target is not None else "scratch",
                    "scratch_accuracy": scratch}
        return self._artifact(context, names, frozen, grown, new, outcome, decision)

    def _artifact(self, context: TrainingContext, names: list[str], frozen: Tensors, grown: Tensors, new: Tensors,
                  outcome: _Outcome, decision: dict) -> TaskArtifact:
        """The task's parts (kernels it keeps; units of `new` it keeps, as its grown channels), new
        backbone, and metrics."""
        hidden, head = names[:-1], names[-1]
        channels = {n: k.any(1) & new[n] for n, k in zip(hidden, outcome.kernels)}
        growth_masks = {**{f"{layer_of(n)}.kernels": k for n, k in zip(hidden, outcome.kernels)},
                        **{f"{layer_of(n)}.channels": c for n, c in channels.items()}}
        units = {n: grown[n] | channels[n] for n in hidden}
        metrics = {
            **decision, "validation_accuracy": outcome.accuracy,
            "grown_units": {n: int(c.sum()) for n, c in channels.items()},
            "units": {n: int(u.sum()) for n, u in units.items()},
            "reused_kernels": sum(int((k & frozen[n]).sum()) for n, k in zip(hidden, outcome.kernels)),
            "new_kernels": sum(int((k & ~frozen[n]).sum()) for n, k in zip(hidden, outcome.kernels)),
            **self._sizes(context, outcome, hidden, head, units),
        }
        return TaskArtifact(parts={"growth_masks": growth_masks, "head": outcome.head}, metrics=metrics,
                            backbone=outcome.backbone)

    def _holdout(self, task: TaskData, generator: torch.Generator) -> tuple[TaskData, tuple[torch.Tensor, torch.Tensor]]:
        """(the task with `val_fraction` of its training set removed, that share as (x, y))."""
        order = torch.randperm(len(task.y_train), generator=generator)
        split = max(1, round(self.config.val_fraction * len(order)))
        held, kept = order[:split], order[split:]
        return replace(task, x_train=task.x_train[kept], y_train=task.y_train[kept]), (task.x_train[held], task.y_train[held])

    def _scratch(self, plain: nn.Module, train_part: TaskData, holdout, task: TaskData, generator: torch.Generator) -> tuple[float, float]:
        """Train the full-width network alone on the task: (holdout accuracy, test accuracy)."""
        weights = [plain.get_parameter(n) for n in maskable_parameters(plain)]
        with torch.no_grad():
            for weight in weights:
                nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
        fit(plain, train_part, weights, epochs=self.config.scratch_epochs, lr=self.config.lr, momentum=self.config.momentum,
            batch_size=self.config.batch_size, generator=generator, desc=f"task {task.index} ({task.name}) from scratch")
        params = {n: p.detach() for n, p in plain.named_parameters()}
        return _accuracy(plain, params, *holdout, task.num_classes), _accuracy(plain, params, task.x_test, task.y_test, task.num_classes)

    def _attach(self, module: nn.Module, backbone: Tensors, frozen: Tensors, grown: Tensors,
                generator: torch.Generator) -> dict[str, GrowthMask]:
        """Fresh weights in `module` (He-normal over each layer's inputs from grown units) and growth
        masks on its hidden layers; the last layer is the task's fresh head."""
        masks, share = {}, 1.0  # share: the fraction of a layer's inputs that come from grown units
        for name in maskable_parameters(module):
            owner, attr = name.rsplit(".", 1)
            layer, weight = module.get_submodule(owner), module.get_parameter(name)
            fan_in = max(1.0, weight[0].numel() * share)
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * math.sqrt(2 / fan_in))
            if name in frozen:
                masks[name] = GrowthMask(backbone[name], frozen[name], self.config, generator)
                parametrize.register_parametrization(layer, attr, masks[name])
                share = float(grown[name].float().mean())
        return masks

    @staticmethod
    def _make_available(masks: dict[str, GrowthMask], hidden: list[str], units: Tensors, candidates: Tensors) -> None:
        """Make every kernel between `units` (and from every input of the first layer) trainable;
        `candidates` get a grown mask."""
        inputs = torch.ones(masks[hidden[0]].available.shape[1], dtype=torch.bool)
        for name in hidden:
            masks[name].available.copy_(units[name][:, None] & inputs[None, :])
            masks[name].candidates.copy_(candidates[name])
            inputs = units[name]

    def _train(self, module: nn.Module, masks: dict[str, GrowthMask], task: TaskData, epochs: int,
               generator: torch.Generator, desc: str) -> None:
        """The shared SGD loop on the weights and head; the masks' scores follow with Adam (`MaskSteps`)."""
        cfg = self.config
        steps = MaskSteps(masks, cfg, epochs, math.ceil(len(task.y_train) / cfg.batch_size))
        weights = [p for p in module.parameters() if all(p is not s for s in steps.scores)]
        fit(module, task, weights, epochs=epochs, lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size,
            generator=generator, desc=desc, before_step=steps.before_step, after_step=steps.after_step)

    def _outcome(self, module: nn.Module, plain: nn.Module, masks: dict[str, GrowthMask], names: list[str],
                 backbone: Tensors, frozen: Tensors, holdout, task: TaskData) -> _Outcome:
        """Binarise the masks, drop dead kernels, build the next backbone and the head, and score
        them on the holdout exactly as they will be served."""
        hidden, head = names[:-1], names[-1]
        with torch.no_grad():
            kernels = prune_dead([masks[n].kept() for n in hidden])
            new_backbone = dict(backbone)
            for name, kept in zip(hidden, kernels):
                owner, attr = name.rsplit(".", 1)
                trained = module.get_submodule(owner).parametrizations[attr].original
                new_backbone[name] = torch.where(per_kernel(kept & ~frozen[name], trained), trained, backbone[name])
            head_weight = module.get_parameter(head).detach().clone()
            head_weight[task.num_classes:] = 0.0  # rows of classes the task does not have
            unused = ~kernels[-1].any(1)  # units of the last hidden layer the task does not use: their columns
            head_weight[:, unused.repeat_interleave(head_weight.shape[1] // len(unused))] = 0.0
        parts = {"growth_masks": {f"{layer_of(n)}.kernels": k for n, k in zip(hidden, kernels)}, "head": {head: head_weight}}
        params = effective_parameters(self.name, new_backbone, parts)
        return _Outcome(kernels, new_backbone, {head: head_weight}, _accuracy(plain, params, *holdout, task.num_classes))

    def _sizes(self, context: TrainingContext, outcome: _Outcome, hidden: list[str], head: str, units: Tensors) -> dict[str, float]:
        """model_size (weights some task uses) and grown_size (the grown architecture) over one full-width network."""
        full = sum(t.numel() for t in context.backbone.values())
        heads = [t.parts["head"][head] for t in context.tasks] + [outcome.head[head]]
        kept = sum(int((outcome.backbone[n] != 0).sum()) for n in hidden) + sum(int((h != 0).sum()) for h in heads)
        architecture, share = 0.0, 1.0  # share: the fraction of a layer's inputs that come from grown units
        for name in hidden:
            architecture += int(units[name].sum()) * context.backbone[name][0].numel() * share
            share = float(units[name].float().mean())
        architecture += sum(int(h.any(1).sum()) for h in heads) * context.backbone[head][0].numel() * share
        return {"model_size": kept / full, "grown_size": architecture / full}


def _accuracy(module: nn.Module, params: Tensors, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    with torch.no_grad():
        return float((forward(module, params, x)[:, :num_classes].argmax(1) == y).float().mean())
