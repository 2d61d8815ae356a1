"""ExSSNeT (Yadav & Bansal, 2023): SupSup's supermasks plus exclusive training of the weights no
earlier task uses, with optional KKT (kNN-based knowledge transfer) to initialise a task's scores.

Per task t:

1. KKT (`kkt=True`, t > 0): on ~`kkt_fraction` of the task's training batches, extract the
   penultimate features (the input of the last layer) of every earlier subnetwork i (mask M_i over
   the current backbone), fit a Euclidean majority-vote kNN on 66% of them and score it on the other
   34%. If the best earlier task beats chance by a margin, M_t's scores start as a copy of its
   final scores.
2. Mask phase: learn M_t over the current weights exactly as SupSup does (edge-popup, top-k at
   `density`, SGD with momentum and a cosine schedule on the scores only).
3. Weight phase: with F_t = M_t AND NOT (M_0 OR ... OR M_{t-1}), train the weights through the
   forward W * M_t, zeroing every gradient outside F_t. No weight decay, so SGD's update (momentum
   included: its buffer only ever accumulates zeros there) is exactly zero outside F_t; a check
   after every step compares against a saved copy and raises if any weight outside F_t moved.

Inference for task t is W * M_t over the backbone version published with it (registry/
materialize_exssnet.py). Later tasks change only weights outside every earlier mask, so a published
task stays bit-exact; (any later version) * M_t is identical too.

Note: a task's scores are training state (a later task's KKT copies them), stored in float16 to
halve their size, and only when `kkt` is on; a model's settings cannot change when tasks are
appended, so a model trained without KKT never needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.nn.utils import parametrize

from registry import effective_parameters, head_input, maskable_parameters
from registry.codecs import signed_constant
from registry.errors import MaskbankError

from .fit import fit
from .methods import Method, TaskArtifact, TrainingContext, register_method, require
from .streams import TaskData
from .supsup import EdgePopupMask, attach_frozen, batchnorm_statistics

Tensors = dict[str, torch.Tensor]
KKT_FIT_SHARE = 0.66  # the reference's 66/34 split of the KKT sample into kNN fit and held-out parts


@dataclass
class ExSSNeTConfig:
    # The mask phase takes SupSup's option names (so `--epochs`, `--lr` mean the same for both).
    density: float = 0.1  # fraction of each layer's weights a mask keeps (top-k); ExSSNeT gains most at 2-10%
    epochs: int = 30  # epochs of the mask phase (scores only, as SupSup)
    lr: float = 0.3  # mask phase: SGD on the scores
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on the scores only; the weight phase never uses weight decay
    weight_epochs: int = 10  # epochs of the weight phase (0: none, so SupSup's masks, with KKT if on)
    weight_lr: float = 0.1
    weight_momentum: float = 0.9  # safe: gradients are zero outside F_t from the first step, so is the buffer
    batch_size: int = 64
    kkt: bool = False  # initialise each task's scores from the most similar earlier task
    kkt_fraction: float = 0.2  # share of the task's training batches KKT looks at
    kkt_k: int = 10  # neighbours of the kNN (capped at the fit size); the paper's ablation: 1..50 all work
    kkt_margin: float = 0.1  # KKT transfers only above chance + max(margin, 2 standard errors of chance)
    INERT: ClassVar[dict] = {name: [("kkt", False, "KKT is off: pass --kkt")]
                             for name in ("kkt_fraction", "kkt_k", "kkt_margin")}

    def __post_init__(self):
        require(self, "in (0, 1]", "density", "kkt_fraction")
        require(self, ">= 0", "epochs", "weight_epochs", "weight_decay", "kkt_margin")
        require(self, "> 0", "lr", "weight_lr")
        require(self, ">= 1", "batch_size", "kkt_k")
        require(self, "in [0, 1)", "momentum", "weight_momentum")
        if self.epochs == 0 and self.weight_epochs == 0 and not self.kkt:  # an untrained task, below chance, for good
            raise ValueError("epochs and weight_epochs are both 0 and kkt is off: nothing would be trained (give "
                             "epochs >= 1, weight_epochs >= 1, or kkt=true to start from an earlier task's scores)")


def _union(masks: list[Tensors], name: str, like: torch.Tensor) -> torch.Tensor:
    union = torch.zeros_like(like, dtype=torch.bool)
    for mask in masks:
        union |= mask[name]
    return union


def free_mask(mask: Tensors, earlier: list[Tensors]) -> Tensors:
    """F_t = M_t AND NOT (union of the earlier masks), per layer."""
    return {name: m & ~_union(earlier, name, m) for name, m in mask.items()}


def sparse_overlap(mask: Tensors, earlier: list[Tensors]) -> float:
    """(|M_t| - |M_t AND NOT union_{j<t} M_j|) / |M_t|: the share of M_t that earlier tasks use too."""
    kept = sum(int(m.sum()) for m in mask.values())
    free = sum(int(f.sum()) for f in free_mask(mask, earlier).values())
    return (kept - free) / kept if kept else 0.0


def zero_outside(weights: dict[str, torch.Tensor], free: Tensors) -> None:
    """Zero the gradient of every weight outside the free mask (in place)."""
    for name, weight in weights.items():
        if weight.grad is not None:
            weight.grad.masked_fill_(~free[name], 0.0)


def check_exclusive(weights: dict[str, torch.Tensor], reference: Tensors, free: Tensors) -> None:
    """Raise RuntimeError if any weight outside `free` differs from `reference` (NaN counts as moved).

    This is what keeps earlier tasks bit-exact: they only see weights outside F_t."""
    for name, weight in weights.items():
        moved = (weight.detach() != reference[name]) & ~free[name]
        if moved.any():
            first = int(moved.flatten().nonzero()[0])
            before, after = float(reference[name].flatten()[first]), float(weight.detach().flatten()[first])
            raise RuntimeError(
                f"ExSSNeT exclusivity violated: {int(moved.sum())} weight(s) of '{name}' outside the task's free "
                f"mask moved (first at flat index {first}: {before!r} -> {after!r}); earlier tasks would no "
                "longer be bit-exact"
            )


def penultimate_features(module: nn.Module, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """[N, features] input of the module's last masked layer when run with `params`."""
    training = module.training
    try:
        with torch.no_grad():  # eval: BatchNorm normalises with the subnetwork's own statistics, as served
            return head_input(module, params, x).flatten(1)
    finally:
        module.train(training)


def knn_accuracy(fit_x: torch.Tensor, fit_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int) -> float:
    """Accuracy on (test_x, test_y) of a Euclidean, majority-vote kNN fitted on (fit_x, fit_y)."""
    knn = KNeighborsClassifier(n_neighbors=min(k, len(fit_x)), metric="euclidean", weights="uniform")
    knn.fit(fit_x.numpy(), fit_y.numpy())
    return float(knn.score(test_x.numpy(), test_y.numpy()))


class _FixedMask(nn.Module):
    """Parametrization W -> W * M for the weight phase (M fixed, the weights train)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask



@register_method
class ExSSNeT(Method):
    """SupSup masks over a backbone whose still-unused weights each task trains exclusively."""

    name = "exssnet"
    backbone_codec = "signed-constant/v1"  # version 1; the loop stores trained versions as tensors / deltas
    Config = ExSSNeTConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        """SupSup's fixed random start: signed-constant init of every maskable weight."""
        params = dict(module.named_parameters())
        return {name: signed_constant(tuple(params[name].shape), generator) for name in maskable_parameters(module)}

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext) -> TaskArtifact:
        cfg = self.config
        earlier = [self._masks_of(t) for t in context.tasks]
        metrics: dict = {}
        initial = None
        if cfg.kkt:
            source, initial, metrics["kkt_accuracies"], metrics["kkt_threshold"] = self.transfer(module, task, generator, context)
            metrics["kkt_source"] = source
        popups = self._attach(module, context.backbone, generator)
        if initial is not None:
            with torch.no_grad():
                for name, popup in popups.items():
                    popup.scores.copy_(initial[name])
        fit(module, task, [p.scores for p in popups.values()], epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
             weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, generator=generator,
             desc=f"task {task.index} ({task.name}) mask")
        with torch.no_grad():
            masks = {name: p.mask().to(torch.bool) for name, p in popups.items()}
            scores = {name: p.scores.detach().to(torch.float16) for name, p in popups.items()}
        free = free_mask(masks, earlier)
        backbone = self._train_weights(module, task, masks, free, generator)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        claimed = sum(int((masks[n] | _union(earlier, n, m)).sum()) for n, m in masks.items())
        trained = sum(int(f.sum()) for f in free.values())
        metrics.update(
            density=kept / total,
            sparse_overlap=sparse_overlap(masks, earlier),
            free_fraction=trained / kept,  # share of M_t this task trained (1 - sparse overlap)
            weights_trained=trained if backbone is not None else 0,
            unclaimed_fraction=1 - claimed / total,  # backbone weights no task's mask holds yet
        )
        parts = {"masks": masks}
        if stats := batchnorm_statistics(module):  # per-task BN, gathered while training (mostly the weight phase)
            parts["bn_stats"] = stats
        state = {"scores": scores} if cfg.kkt else {}
        return TaskArtifact(parts=parts, metrics=metrics, state=state, backbone=backbone)

    def transfer(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext
                 ) -> tuple[int | None, Tensors | None, dict[str, float], float | None]:
        """KKT: (source task id or None, its scores as float32 or None, kNN accuracy per earlier task id
        (as a string, for JSON), the accuracy a source had to beat or None when there was nothing to try).

        The threshold is chance (1 / classes) plus the larger of `kkt_margin` and two standard errors
        of a chance-level score on the held-out part, so a tiny held-out set cannot pass by luck."""
        cfg = self.config
        if not context.tasks:
            return None, None, {}, None
        n = len(task.y_train)
        take = max(1, round(cfg.kkt_fraction * math.ceil(n / cfg.batch_size))) * cfg.batch_size
        sample = torch.randperm(n, generator=generator)[:take]
        fit = round(KKT_FIT_SHARE * len(sample))
        if fit < 1 or fit == len(sample):  # too few examples to fit and score a kNN
            return None, None, {}, None
        x, y = task.x_train[sample], task.y_train[sample]
        chance = 1.0 / task.num_classes
        threshold = chance + max(cfg.kkt_margin, 2 * math.sqrt(chance * (1 - chance) / (len(sample) - fit)))
        accuracies = {}
        for earlier in context.tasks:
            params = effective_parameters(self.name, context.backbone, earlier.parts)
            features = penultimate_features(module, params, x)
            accuracies[earlier.id] = knn_accuracy(features[:fit], y[:fit], features[fit:], y[fit:], cfg.kkt_k)
        best = max(accuracies, key=lambda i: (accuracies[i], -i))  # ties: the earliest task
        report = {str(i): a for i, a in accuracies.items()}
        if accuracies[best] <= threshold:
            return None, None, report, threshold
        source = next(t for t in context.tasks if t.id == best)
        if "scores" not in source.state:
            raise MaskbankError(f"task {best} ({source.name}) has no stored scores for KKT to copy; it was not "
                                "trained with kkt on, so this model cannot use KKT")
        return best, {name: s.to(torch.float32) for name, s in source.state["scores"].items()}, report, threshold

    def _train_weights(self, module: nn.Module, task: TaskData, masks: Tensors, free: Tensors,
                       generator: torch.Generator) -> Tensors | None:
        """The weight phase: the new backbone, or None when there is nothing to train."""
        cfg = self.config
        if cfg.weight_epochs == 0 or not any(f.any() for f in free.values()):
            return None
        weights = {}
        for name, mask in masks.items():
            owner, attr = name.rsplit(".", 1)
            layer = module.get_submodule(owner)
            parametrize.remove_parametrizations(layer, attr, leave_parametrized=False)  # back to the plain weight
            parametrize.register_parametrization(layer, attr, _FixedMask(mask))
            weights[name] = layer.parametrizations[attr].original.requires_grad_(True)
        reference = {name: w.detach().clone() for name, w in weights.items()}
        fit(module, task, list(weights.values()), epochs=cfg.weight_epochs, lr=cfg.weight_lr,
             momentum=cfg.weight_momentum, weight_decay=0.0, batch_size=cfg.batch_size, generator=generator,
             desc=f"task {task.index} ({task.name}) weights", remedy="lower the weight phase's --set weight_lr",
             before_step=lambda: zero_outside(weights, free),
             after_step=lambda: check_exclusive(weights, reference, free))
        return {name: w.detach().clone() for name, w in weights.items()}

    def _attach(self, module: nn.Module, backbone: Tensors, generator: torch.Generator) -> dict[str, EdgePopupMask]:
        """Load `backbone` into `module`, freeze it, and put an edge-popup mask (top-k) on every weight."""
        return attach_frozen(module, backbone, lambda name, w: EdgePopupMask(w.shape, self.config.density, generator))

    @staticmethod
    def _masks_of(task) -> Tensors:
        if "masks" not in task.parts:
            raise MaskbankError(f"task {task.id} ({task.name}) has no masks; ExSSNeT can only extend mask-based tasks")
        return task.parts["masks"]
