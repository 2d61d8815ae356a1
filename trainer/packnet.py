"""packnet-share: PackNet-style structured pruning with per-task decisions to share or omit earlier
subnetworks (Andle, Payani & Yasaei Sekeh, 2023; PackNet: Mallya & Lazebnik, 2018).

A *filter* is an output unit of a Linear layer or an output channel of a Conv2d layer; the last
layer is a per-task output layer (the task's `head` part) whose units are never shared. Per task t:

1. Usefulness scores of every earlier subnetwork S_j, on `score_samples` training examples of task t
   run through task j's network: the mean activation of S_j's filters, and the *connectivity*, the
   mean over adjacent hidden-layer pairs (l, l+1) of the mean over filter pairs (a in S_j(l),
   b in S_j(l+1)) of the squared Pearson correlation of their activations (`connectivity`). All are
   recorded in the task's metrics, under "scores".
2. The `share` strategy picks earlier subnetworks (`choose_shared`): `all`, `none`, `lowest` (only
   the one with the lowest connectivity), `omit-lowest` (all but that one), or an explicit comma
   list of task ids (ids not learned yet are skipped, so one list serves every task). Sharing a
   filter shares the filters it depends on: the chosen set is closed over the earlier tasks' own
   shares (`dependency_closure`); the closed set is the artifact's `shares`.
3. Train the free filters (no earlier task owns them) and the new head on top of the shared,
   frozen filters (they feed the task but never change: their gradient is zeroed, and a check
   after every optimiser step raises if one moved).
4. Prune `prune` of the free filters of each hidden layer by the L1 norm of their (masked) incoming
   weights, keeping at least one; fine-tune; the kept free filters become S_t, frozen from now on.
   Before publishing, each S_t row's weights from inputs the task does not use are zeroed, so a
   frozen filter computes the same function in every later task that shares it.

A task's served network needs only its own parts (registry/materialize_packnet.py): `filter_mask`
lists, per layer, every filter it uses (S_t plus the shared subnetworks) and every input it uses;
`head` is its output layer. The backbone is published anew after every task (a sparse delta).

When a hidden layer has no free filter left, learning a task is an error (`MaskbankError`): a task
with no own filters in some layer would be a different method (head-only transfer), and silently
training it would hide that the model is full. Restrictions: a plain chain of bias-free Linear /
Conv2d layers (ReLU, pooling, flatten between them): the `mlp`, `lenet300-100`, `cnn` and `vgg`
architectures with `bn: "none"`; BatchNorm and residual networks (resnet18) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from registry import effective_parameters, forward, maskable_parameters
from registry.errors import MaskbankError
from registry.materialize_packnet import filter_masked, in_key, out_key

from .methods import Method, PublishedTask, TaskArtifact, TrainingContext, he_normal_backbone, register_method, require
from .fit import fit
from .streams import TaskData

Tensors = dict[str, torch.Tensor]
SHARE_STRATEGIES = ("all", "none", "lowest", "omit-lowest")


def parse_share(share: str) -> tuple[int, ...] | None:
    """The task ids of an explicit `share` list ("0,2"), or None for a named strategy."""
    if not isinstance(share, str):
        raise ValueError(f"share must be a string ({', '.join(SHARE_STRATEGIES)} or task ids like '0,2'), got {share!r}")
    if share in SHARE_STRATEGIES:
        return None
    try:
        ids = tuple(int(part) for part in share.split(","))
    except ValueError:
        raise ValueError(f"share must be one of {SHARE_STRATEGIES} or a comma list of task ids like '0,2', "
                         f"got {share!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"share task ids must be >= 0, got {share!r}")
    return ids


@dataclass
class PackNetShareConfig:
    share: str = "all"  # all | none | lowest | omit-lowest | explicit task ids "0,2" (see choose_shared)
    prune: float = 0.65  # fraction of each hidden layer's free filters pruned after training (the paper's 65%)
    epochs: int = 20  # training epochs of the free filters and the head
    finetune_epochs: int = 10  # epochs after pruning (0: none)
    lr: float = 0.05  # SGD learning rate (cosine schedule) while training
    finetune_lr: float = 0.01  # SGD learning rate (cosine schedule) while fine-tuning
    momentum: float = 0.9  # safe: frozen rows get zero gradient from the first step, so does the buffer
    batch_size: int = 32
    score_samples: int = 256  # training examples of the new task the usefulness scores are computed on

    def __post_init__(self):
        parse_share(self.share)
        require(self, "in [0, 1)", "prune", "momentum")
        require(self, ">= 1", "epochs")  # 0 pruned an untrained network (fine-tuning may be 0)
        require(self, ">= 0", "finetune_epochs")
        require(self, "> 0", "lr", "finetune_lr")
        require(self, ">= 1", "batch_size")
        require(self, ">= 2", "score_samples")  # a correlation over one example is undefined


# ---------------------------------------------------------------- the network as a chain of filter layers


@dataclass(frozen=True)
class FilterLayer:
    name: str  # the weight's name, e.g. "fc0.weight"
    module: nn.Module  # the Linear or Conv2d
    repeat: int  # each input filter of this layer spans `repeat` inputs (H*W after a conv -> linear flatten)
    relu: bool  # followed by a ReLU: activations are taken after it


_PASSIVE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity)


def filter_layers(module: nn.Module, method: str = "packnet-share") -> list[FilterLayer]:
    """The masked layers of `module` in forward order; raises MaskbankError (naming `method`) for what
    cannot be masked filter by filter."""
    found: list[tuple[str, nn.Module]] = []
    relu: set[int] = set()
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child.bias is None:
                found.append((f"{child_name}.weight", child))
            elif isinstance(child, nn.ReLU) and found:
                relu.add(len(found) - 1)
            elif not isinstance(child, _PASSIVE):
                found = []
                break
    if not found or [name for name, _ in found] != maskable_parameters(module) or len(found) < 2:
        kinds = sorted({type(m).__name__ for m in module.modules()} - {type(module).__name__})
        raise MaskbankError(
            f"{method} needs a plain chain of at least two bias-free Linear/Conv2d layers with only ReLU, "
            f"pooling and flatten between them (mlp, lenet300-100, cnn or vgg with bn 'none'); this architecture "
            f"has {kinds}. BatchNorm and residual blocks are not supported")
    layers = []
    for i, (name, layer) in enumerate(found):
        repeat = 1
        if i:
            fan_in, previous = layer.weight.shape[1], found[i - 1][1].weight.shape[0]
            if fan_in % previous:
                raise MaskbankError(f"{method}: '{name}' takes {fan_in} inputs, not a multiple of the "
                                    f"{previous} filters of the layer before it")
            repeat = fan_in // previous
        layers.append(FilterLayer(name, layer, repeat, i in relu))
    return layers


def input_mask(layers: Sequence[FilterLayer], index: int, out: Tensors) -> torch.Tensor:
    """Which inputs of layer `index` a task uses, given the filters `out` it uses in each layer."""
    layer = layers[index]
    if index == 0:
        return torch.ones(layer.module.weight.shape[1], dtype=torch.bool)
    return out[layers[index - 1].name].repeat_interleave(layer.repeat)


def filter_activations(module: nn.Module, layers: Sequence[FilterLayer], params: Tensors, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer of `layers`, [N, filters] activations (after ReLU; conv maps averaged over space) of
    `module` run with `params` on `x`."""
    captured: list[torch.Tensor] = []

    def hook(layer: FilterLayer):
        def grab(_module, _args, output):
            value = output.relu() if layer.relu else output
            captured.append(value.flatten(2).mean(2) if value.dim() > 2 else value)
        return grab

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            forward(module, params, x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------- usefulness scores and sharing decisions


def squared_correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[p, q] squared Pearson correlations between the columns of a [N, p] and b [N, q].

    A constant column (a filter that does not vary on the data, e.g. dead under ReLU) correlates
    with nothing: its entries are 0, not NaN."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    varies_a, varies_b = a.amax(0) > a.amin(0), b.amax(0) > b.amin(0)
    a, b = a - a.mean(0), b - b.mean(0)
    r = (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :])
    return torch.where(varies_a[:, None] & varies_b[None, :], r, torch.zeros_like(r)).square()


def connectivity(activations: Sequence[torch.Tensor]) -> float | None:
    """Mean over adjacent layer pairs (l, l+1) of the mean squared Pearson correlation over filter
    pairs, from per-layer [N, filters] activations of one subnetwork; None with fewer than two layers
    (or no filter pairs)."""
    pairs = [squared_correlations(a, b).mean() for a, b in zip(activations, activations[1:]) if a.shape[1] and b.shape[1]]
    return float(torch.stack(pairs).mean()) if pairs else None


def mean_activation(activations: Sequence[torch.Tensor]) -> float:
    """Mean activation over every filter (of all layers) and example."""
    values = torch.cat([a.to(torch.float64) for a in activations], dim=1)
    return float(values.mean()) if values.numel() else 0.0


def choose_shared(share: str, earlier: Sequence[int], scores: dict[int, float | None]) -> tuple[int, ...]:
    """The earlier task ids whose subnetworks `share` picks (before the dependency closure).

    `scores` is the connectivity of each earlier subnetwork; `lowest` / `omit-lowest` take the
    lowest (ties: the earliest task)."""
    earlier = sorted(earlier)
    explicit = parse_share(share)
    if explicit is not None:
        return tuple(i for i in earlier if i in explicit)
    if share == "all" or not earlier:
        return tuple(earlier)
    if share == "none":
        return ()
    if any(scores.get(i) is None for i in earlier):
        raise MaskbankError(f"share '{share}' ranks subnetworks by connectivity, which needs at least two hidden "
                            "layers; use 'all', 'none' or an explicit list of task ids with this architecture")
    lowest = min(earlier, key=lambda i: (scores[i], i))
    return (lowest,) if share == "lowest" else tuple(i for i in earlier if i != lowest)


def dependency_closure(chosen: Sequence[int], shares_of: dict[int, Sequence[int]]) -> tuple[int, ...]:
    """`chosen` plus every subnetwork they depend on (their own shares, transitively), sorted."""
    result: set[int] = set()
    stack = list(chosen)
    while stack:
        task = stack.pop()
        if task not in result:
            result.add(task)
            stack.extend(shares_of[task])
    return tuple(sorted(result))


# ---------------------------------------------------------------- frozen filters


def zero_frozen_gradients(weights: Tensors, frozen: Tensors) -> None:
    """Zero the gradient of every frozen filter's row (in place)."""
    for name, rows in frozen.items():
        if weights[name].grad is not None:
            weights[name].grad[rows] = 0.0


def check_frozen(weights: Tensors, reference: Tensors, frozen: Tensors) -> None:
    """Raise RuntimeError if a frozen filter's weights differ from `reference` (NaN counts as moved)."""
    for name, rows in frozen.items():
        moved = (weights[name].detach()[rows] != reference[name][rows]).flatten(1).any(1)
        if moved.any():
            filters = rows.nonzero().flatten()[moved].tolist()
            raise RuntimeError(
                f"packnet-share: frozen filter(s) {filters[:10]} of '{name}' changed ({len(filters)} in all); "
                "earlier tasks and the subnetworks shared with them would no longer be bit-exact")


class _FilterMask(nn.Module):
    """Parametrization W -> W with the rows outside `out` and the columns outside `inputs` zeroed."""

    def __init__(self, out: torch.Tensor, inputs: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out.clone())
        self.register_buffer("inputs", inputs.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return filter_masked(weight, self.out, self.inputs)



# ---------------------------------------------------------------- the method


def _union(masks: list[torch.Tensor], size: int) -> torch.Tensor:
    result = torch.zeros(size, dtype=torch.bool)
    for mask in masks:
        result = result | mask
    return result


@register_method
class PackNetShare(Method):
    """Structured PackNet over a trained backbone, sharing or omitting earlier subnetworks per task."""

    name = "packnet-share"
    backbone_codec = "tensors/v1"
    Config = PackNetShareConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        filter_layers(module)  # refuse an unsupported architecture before anything is published
        return he_normal_backbone(module, generator)

    @staticmethod
    def own_filters(tasks: Sequence[PublishedTask], hidden: Sequence[FilterLayer]) -> dict[int, Tensors]:
        """S_j per earlier task j and hidden layer: the filters task j uses minus those of the tasks it shares."""
        used = {}
        for t in tasks:
            if "filter_mask" not in t.parts:
                raise MaskbankError(f"task {t.id} ({t.name}) has no filter_mask; packnet-share can only extend its own tasks")
            used[t.id] = {layer.name: t.parts["filter_mask"][out_key(layer.name)] for layer in hidden}
        return {t.id: {n: u & ~_union([used[i][n] for i in t.shares], len(u)) for n, u in used[t.id].items()} for t in tasks}

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext) -> TaskArtifact:
        cfg = self.config
        layers = filter_layers(module)
        hidden, head = layers[:-1], layers[-1]
        if cfg.share in ("lowest", "omit-lowest") and len(hidden) < 2:
            raise MaskbankError(f"share '{cfg.share}' ranks subnetworks by connectivity, which needs at least two hidden "
                                "layers; use 'all', 'none' or an explicit list of task ids with this architecture")
        owned = self.own_filters(context.tasks, hidden)
        size = {l.name: context.backbone[l.name].shape[0] for l in hidden}
        frozen = {n: _union([own[n] for own in owned.values()], size[n]) for n in size}
        for name, rows in frozen.items():
            if rows.all():
                raise MaskbankError(
                    f"packnet-share: layer '{name}' has no free filters left for task {task.index} ({task.name}): the "
                    f"subnetworks of tasks {sorted(owned)} hold all {rows.numel()} of them. Train a new model with a "
                    "wider architecture or a larger prune fraction")
        free = {name: ~rows for name, rows in frozen.items()}

        scores = self._scores(module, hidden, task, generator, context, owned)
        chosen = choose_shared(cfg.share, list(owned), {j: s["connectivity"] for j, s in scores.items()})
        shares = dependency_closure(chosen, {t.id: t.shares for t in context.tasks})
        shared = {n: _union([owned[j][n] for j in shares], size[n]) for n in size}

        weights, masks = self._attach(module, layers, context.backbone, {n: shared[n] | free[n] for n in size}, generator)
        hidden_weights = {n: weights[n] for n in size}
        reference = {n: context.backbone[n].clone() for n in size}
        guard = {"before_step": lambda: zero_frozen_gradients(hidden_weights, frozen),
                 "after_step": lambda: check_frozen(hidden_weights, reference, frozen)}
        common = {"momentum": cfg.momentum, "batch_size": cfg.batch_size, "generator": generator, **guard}
        loss = fit(module, task, list(weights.values()), epochs=cfg.epochs, lr=cfg.lr,
                    desc=f"task {task.index} ({task.name}) train", **common)
        out = self._prune(layers, weights, masks, free, shared)
        tuned = fit(module, task, list(weights.values()), epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                     desc=f"task {task.index} ({task.name}) fine-tune", remedy="lower --set finetune_lr", **common)

        with torch.no_grad():
            filter_mask = {}
            for layer in layers:
                filter_mask[out_key(layer.name)] = masks[layer.name].out.clone()
                filter_mask[in_key(layer.name)] = masks[layer.name].inputs.clone()
            backbone = {name: tensor.clone() for name, tensor in context.backbone.items()}
            for name in size:  # freeze S_t: its rows, with the weights from inputs it does not use zeroed
                weight, mine = weights[name].detach().clone(), out[name] & free[name]
                weight[mine] = filter_masked(weight[mine], torch.ones(int(mine.sum()), dtype=torch.bool),
                                             filter_mask[in_key(name)])
                backbone[name] = weight
            head_weight = filter_masked(weights[head.name].detach(), filter_mask[out_key(head.name)],
                                        filter_mask[in_key(head.name)])
        metrics = {
            "share": cfg.share,
            "chosen": list(chosen),
            "shares": list(shares),
            "scores": {str(j): s for j, s in scores.items()},
            "own_filters": {n: int((out[n] & free[n]).sum()) for n in size},
            "used_filters": {n: int(out[n].sum()) for n in size},
            "free_filters_left": {n: int((free[n] & ~out[n]).sum()) for n in size},
            "final_loss": tuned if tuned is not None else loss,
        }
        return TaskArtifact(parts={"filter_mask": filter_mask, "head": {head.name: head_weight}}, metrics=metrics,
                            backbone=backbone, shares=shares)

    def _scores(self, module: nn.Module, hidden: Sequence[FilterLayer], task: TaskData, generator: torch.Generator,
                context: TrainingContext, owned: dict[int, Tensors]) -> dict[int, dict[str, float | None]]:
        """Usefulness of each earlier S_j for `task`: its filters' activations on a sample of the task's
        training data, run through task j's own network (S_j with what it depends on)."""
        sample = task.x_train[torch.randperm(len(task.y_train), generator=generator)[: self.config.score_samples]]
        scores = {}
        for t in context.tasks:
            activations = filter_activations(module, hidden, effective_parameters(self.name, context.backbone, t.parts), sample)
            own = [a[:, owned[t.id][layer.name]] for a, layer in zip(activations, hidden)]
            scores[t.id] = {"mean_activation": mean_activation(own), "connectivity": connectivity(own)}
        return scores

    def _prune(self, layers: Sequence[FilterLayer], weights: Tensors, masks: dict[str, "_FilterMask"], free: Tensors,
               shared: Tensors) -> Tensors:
        """Keep the `1 - prune` free filters of each hidden layer (at least one) with the largest L1 norm
        of their used incoming weights; narrow the masks to them; return the filters now used per layer."""
        out = {}
        with torch.no_grad():
            for layer in layers[:-1]:
                mask = masks[layer.name]
                norms = filter_masked(weights[layer.name], mask.out, mask.inputs).abs().flatten(1).sum(1)
                candidates = free[layer.name].nonzero().flatten()
                keep = max(1, len(candidates) - round(self.config.prune * len(candidates)))
                best = candidates[torch.argsort(norms[candidates], descending=True, stable=True)[:keep]]
                out[layer.name] = shared[layer.name].clone()
                out[layer.name][best] = True
            for i, layer in enumerate(layers):
                masks[layer.name].out.copy_(out.get(layer.name, masks[layer.name].out))
                masks[layer.name].inputs.copy_(input_mask(layers, i, out))
        return out

    def _attach(self, module: nn.Module, layers: Sequence[FilterLayer], backbone: Tensors, out: Tensors,
                generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, _FilterMask]]:
        """Load the backbone (and a fresh head) into `module` behind filter-mask parametrizations;
        return the trainable raw weights and the masks, by weight name."""
        weights, masks = {}, {}
        for i, layer in enumerate(layers):
            attr = layer.name.rsplit(".", 1)[1]
            with torch.no_grad():
                if i == len(layers) - 1:  # the task's own head, from the default Linear/Conv init
                    initial = torch.empty_like(backbone[layer.name])
                    nn.init.kaiming_uniform_(initial, a=math.sqrt(5), generator=generator)
                else:
                    initial = backbone[layer.name]
                getattr(layer.module, attr).copy_(initial)
            getattr(layer.module, attr).requires_grad_(True)
            rows = out.get(layer.name, torch.ones(initial.shape[0], dtype=torch.bool))
            masks[layer.name] = _FilterMask(rows, input_mask(layers, i, out))
            parametrize.register_parametrization(layer.module, attr, masks[layer.name])
            weights[layer.name] = layer.module.parametrizations[attr].original
        return weights, masks
