"""ImpressLearn: tasks as learned combinations of a few shared binary basis masks.

The backbone is fixed and signed-constant (as SupSup's). A small set of B binary **basis masks**
(edge-popup supermasks at `density`) is built once and shared by every task, published as the
model-level part "basis_masks". Every task then stores only alpha (kind "alpha": one float [B]
vector per masked weight); its effective weight of layer i is `W_i * sum_t alpha_{t,i} M_{t,i}`
(registry/materialize_impresslearn.py). Only alpha trains, from alpha = 1/B, with an optional
penalty `penalty * sum_i (sum_t |alpha_{t,i}| - 1)^2`.

How the basis is built (`basis`):

* `hetero` (default): tasks 0..B-1 each learn a SupSup mask, appended to the basis (the shared part
  is re-published with the grown stack); such a task's alpha is one-hot on its own mask, so it is
  served exactly like SupSup. Its alpha has only as many entries as the basis had then: the
  materialiser combines the first len(alpha) masks, and the basis is append-only, so published
  tasks stay bit-exact while it grows (`check_append_only` refuses anything else).
* `homo`: task 0 learns B masks with B different seeds, then learns its alpha like later tasks.
* `random`: task 0 draws B random masks at `density` (no training), then learns its alpha.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from registry.errors import InvalidArtifact
from registry.materialize_impresslearn import superpose

from .fit import check_finite
from .heads import check_plain
from .methods import Method, TaskArtifact, TrainingContext, register_method, require
from .streams import TaskData
from .supsup import EdgePopupMask, SupSup, SupSupConfig, attach_frozen

Tensors = dict[str, torch.Tensor]
BASES = ("hetero", "homo", "random")
OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}


@dataclass
class ImpressLearnConfig:
    """ImpressLearn's settings (saved in the manifest).

    The mask settings are SupSup's defaults, so with the same seed a hetero basis mask is the very
    mask SupSup learns for that task. Alpha: Adam at lr 0.05 for 30 epochs was the best of a small
    sweep on permuted digits (MLP 64-256-256-10, B = 5, tasks 5 and 6: test accuracy 0.47 / 0.29,
    against 0.19 / 0.24 for RMSprop at lr 0.002, the paper's LeNet setting, and 0.30 / 0.28 for Adam
    at 0.01). Training accuracy was as low as test accuracy there: with B x layers coefficients per
    task, capacity rather than the optimiser limits how well a new permutation is learned.
    """

    basis: str = "hetero"  # how the basis masks are built: hetero | homo | random (module docstring)
    basis_size: int = 5  # B, the number of basis masks
    density: float = 0.5  # fraction of each layer's weights a basis mask keeps
    mask_epochs: int = 30  # basis masks: SupSup's recipe (SGD momentum 0.9, cosine schedule)
    mask_lr: float = 0.3
    alpha_epochs: int = 30  # alpha: `alpha_optimizer` at a constant learning rate
    alpha_lr: float = 0.05
    alpha_optimizer: str = "adam"  # adam | rmsprop
    penalty: float = 0.0  # lambda of lambda * sum_i (sum_t |alpha_{t,i}| - 1)^2
    batch_size: int = 64
    INERT: ClassVar[dict] = {name: [("basis", "random", "random basis masks are drawn, not trained")]
                             for name in ("mask_epochs", "mask_lr")}

    def __post_init__(self):
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        require(self, ">= 1", "basis_size", "batch_size")
        require(self, "in (0, 1]", "density")
        require(self, ">= 1", "mask_epochs", "alpha_epochs")  # 0 published untrained basis masks or alphas
        require(self, ">= 0", "penalty")
        require(self, "> 0", "mask_lr", "alpha_lr")
        if self.alpha_optimizer not in OPTIMIZERS:
            raise ValueError(f"alpha_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.alpha_optimizer!r}")


class BasisCombination(nn.Module):
    """Parametrization W -> W * sum_t alpha_t M_t: alpha [B] is this layer's only trainable tensor."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis.to(torch.float32))  # [B, *weight shape]
        self.alpha = nn.Parameter(torch.full((basis.shape[0],), 1.0 / basis.shape[0]))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * superpose(self.alpha, self.basis)


def check_append_only(old: Tensors, new: Tensors) -> None:
    """Raise InvalidArtifact unless basis `new` keeps every mask of `old` unchanged, in order,
    and only appends: published tasks combine a prefix of the basis and must stay bit-exact."""
    if not old:
        return
    if set(old) != set(new):
        raise InvalidArtifact(f"the new basis masks have layers {sorted(new)}, the published ones {sorted(old)}")
    for name, masks in old.items():
        if new[name].shape[0] < masks.shape[0]:
            raise InvalidArtifact(
                f"basis masks '{name}' would shrink from {masks.shape[0]} to {new[name].shape[0]} masks; "
                "the basis is append-only"
            )
        if not torch.equal(new[name][: masks.shape[0]], masks):
            raise InvalidArtifact(
                f"basis masks '{name}' would change published masks; the basis is append-only "
                "(published tasks combine its first masks)"
            )


@register_method
class ImpressLearn(Method):
    name = "impresslearn"
    backbone_codec = "signed-constant/v1"
    Config = ImpressLearnConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        check_plain(module, self.name, "combines basis masks per task")
        return self._supsup().create_backbone(module, generator)

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator,
                   context: TrainingContext) -> TaskArtifact:
        """Grow or build the basis if it is not complete yet (see the module docstring), else learn
        alpha over it. Raises InvalidArtifact if the published basis does not fit the model."""
        cfg = self.config
        published = context.shared.get("basis_masks", {})
        size = next(iter(published.values())).shape[0] if published else 0
        if size > cfg.basis_size:
            raise InvalidArtifact(f"the model's basis has {size} masks, more than basis_size {cfg.basis_size}")
        if size == cfg.basis_size:
            alpha, metrics = self._learn_alpha(module, task, generator, context.backbone, published)
            return TaskArtifact(parts={"alpha": alpha}, metrics=metrics)
        if cfg.basis == "hetero":
            if size != len(context.tasks):
                raise InvalidArtifact(f"a heterogeneous basis grows by one mask per task, but the model has "
                                      f"{len(context.tasks)} task(s) and {size} basis mask(s)")
            mask = self._supsup().learn_task(module, task, generator, context).parts["masks"]
            basis = self._grow(published, [mask])
            one_hot = F.one_hot(torch.tensor(size), size + 1).to(torch.float32)  # selects the new mask
            alpha = {name: one_hot.clone() for name in basis}
            metrics = {"basis_mask": size, "density": self._density([mask])}
            return TaskArtifact(parts={"alpha": alpha}, metrics=metrics, shared={"basis_masks": basis})
        if size or context.tasks:
            raise InvalidArtifact(f"a {cfg.basis} basis is built whole by task 0, but the model has "
                                  f"{len(context.tasks)} task(s) and {size} basis mask(s)")
        if cfg.basis == "homo":
            masks = self._homo_masks(module, task, generator, context)
        else:
            masks = self._random_masks(context.backbone, generator)
        basis = self._grow(published, masks)
        alpha, metrics = self._learn_alpha(module, task, generator, context.backbone, basis)
        metrics["density"] = self._density(masks)
        return TaskArtifact(parts={"alpha": alpha}, metrics=metrics, shared={"basis_masks": basis})

    def _supsup(self) -> SupSup:
        cfg = self.config
        return SupSup(SupSupConfig(density=cfg.density, epochs=cfg.mask_epochs, lr=cfg.mask_lr,
                                   batch_size=cfg.batch_size))

    def _homo_masks(self, module, task, generator, context) -> list[Tensors]:
        """B SupSup masks on one task, each from its own seed drawn from the task's generator."""
        seeds = torch.randint(0, 2**62, (self.config.basis_size,), generator=generator).tolist()
        supsup = self._supsup()
        return [supsup.learn_task(copy.deepcopy(module), task, torch.Generator().manual_seed(s), context).parts["masks"]
                for s in seeds]

    def _random_masks(self, backbone: Tensors, generator: torch.Generator) -> list[Tensors]:
        """B masks keeping a random `density` fraction of each layer (top-k of random scores)."""
        with torch.no_grad():
            return [{name: EdgePopupMask(w.shape, self.config.density, generator).mask().to(torch.bool)
                     for name, w in backbone.items()} for _ in range(self.config.basis_size)]

    @staticmethod
    def _grow(published: Tensors, masks: list[Tensors]) -> Tensors:
        names = published.keys() if published else masks[0].keys()
        basis = {name: torch.cat([*([published[name]] if published else []), *(m[name][None] for m in masks)])
                 for name in names}
        check_append_only(published, basis)
        return basis

    @staticmethod
    def _density(masks: list[Tensors]) -> float:
        kept = sum(int(m.sum()) for ms in masks for m in ms.values())
        return kept / sum(m.numel() for ms in masks for m in ms.values())

    def _learn_alpha(self, module: nn.Module, task: TaskData, generator: torch.Generator, backbone: Tensors,
                     basis: Tensors) -> tuple[Tensors, dict]:
        """Train alpha over `basis` on `task`; the backbone and the basis stay fixed."""
        cfg = self.config
        layers = attach_frozen(module, backbone, lambda name, w: BasisCombination(basis[name]))
        alphas = [c.alpha for c in layers.values()]
        optimizer = OPTIMIZERS[cfg.alpha_optimizer](alphas, lr=cfg.alpha_lr)
        n = len(task.y_train)
        desc, remedy = f"task {task.index} ({task.name}) alpha", "lower --set alpha_lr (or --set penalty)"
        bar = tqdm(range(cfg.alpha_epochs), desc=desc, unit="epoch", leave=False, disable=None)
        for _ in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                logits = module(task.x_train[batch])[:, : task.num_classes]
                loss = F.cross_entropy(logits, task.y_train[batch])
                if cfg.penalty:
                    loss = loss + cfg.penalty * sum((a.abs().sum() - 1) ** 2 for a in alphas)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                check_finite(desc, loss, remedy=remedy)
                total += loss.item() * len(batch)
            check_finite(desc, None, alphas, remedy)
            bar.set_postfix(loss=f"{total / n:.3f}")
        alpha = {name: c.alpha.detach().clone() for name, c in layers.items()}
        return alpha, {"alpha_l1": [round(float(a.abs().sum()), 4) for a in alpha.values()]}
