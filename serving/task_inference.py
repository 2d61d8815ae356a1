"""Task inference (GN): choose the task of an unlabeled batch when the caller does not name one.

* `exhaustive`: run every task and pick the lowest mean output entropy, normalised by log(classes)
  so tasks with different class counts compare fairly. Exact; cost grows with the task count
  (for head-based methods only by one output layer per task: the backbone runs once).
* `oneshot` (SupSup): superpose all task masks with alpha_i = 1/T, take one gradient of the mean
  output entropy with respect to alpha, and pick the task whose alpha lowers it fastest
  (the most negative gradient). Needs mask-based tasks of one backbone.
* `binary` (SupSup's multi-shot): halve the candidates by that gradient, about log2(T) rounds.
* `oneshot-input`: the same gradient, taken only through the first masked layer's alpha (the
  deeper layers stay superposed). Measured on permuted digits (bench/gn_oneshot.py), the output
  layer's share of the full gradient is what biases `oneshot`: it ranks tasks nearly independently
  of the input and dominates the sum. Tasks that differ in how they read the input (permuted
  inputs) are told apart by the first layer; tasks that share the input distribution (split
  streams) may not be.
* `alpha` (ImpressLearn basis-GN): the lowest-entropy basis mask (one forward per basis mask),
  then the task whose alpha is nearest to it. Needs ImpressLearn tasks over a shared basis.

On small networks the gradient rule is biased toward some tasks (measured: 81% of batches right
on 5 permuted-digits tasks, against 100% for exhaustive; binary 94%). A `shortlist` of k > 1
checks the k best-ranked candidates exactly by entropy: the right task was among the one-shot
top 3 for 96% of those batches.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from registry.errors import unknown

from .entropy import mean_entropy
from .errors import InvalidRequest, ModelUnavailable
from .snapshot import LoadedTask, Snapshot


@dataclass(frozen=True)
class TaskChoice:
    """The inferred task, the mode that chose it, and each candidate's score (lower is better)."""

    task: LoadedTask
    mode: str
    scores: dict[int, float]
    logits: torch.Tensor | None = None  # the chosen task's logits, when the mode computed them


def _scores(values: torch.Tensor) -> list[float]:
    """Scores as floats, a non-finite one (an input so large that the network overflows) as +inf: it
    ranks last, so NaN cannot break a ranking (NaN compares false with everything)."""
    return torch.nan_to_num(values, nan=math.inf, posinf=math.inf, neginf=math.inf).tolist()


LogitsOf = Callable[[list[LoadedTask], torch.Tensor], dict[int, torch.Tensor]]  # tasks' forwards, by task id
_MODES: dict[str, Callable[..., TaskChoice]] = {}
_GRADIENT_MODES: set[str] = set()


def register_mode(name: str, gradients: bool = False):
    """Decorator: a GN mode; `gradients` marks one that differentiates through the network."""

    def decorate(fn):
        _MODES[name] = fn
        if gradients:
            _GRADIENT_MODES.add(name)
        return fn

    return decorate


MAX_SHORTLIST = 1000  # the most candidates a gradient mode may check by entropy (request or server default)


def mode_names() -> list[str]:
    return sorted(_MODES)


def needs_gradients(mode: str) -> bool:
    """Whether `mode` differentiates through the network (so only the PyTorch backend can run it)."""
    return mode in _GRADIENT_MODES


def infer_task(mode: str, snapshot: Snapshot, x: torch.Tensor, shortlist: int = 1,
               logits_of: LogitsOf | None = None) -> TaskChoice:
    """Choose the task of `x` with `mode`. `shortlist` k > 1 makes the gradient modes check their
    k best candidates exactly (lowest entropy), trading k forward passes for reliability.
    `logits_of` runs the plain forward passes (default: the snapshot's, on PyTorch)."""
    if mode not in _MODES:
        raise InvalidRequest(str(unknown("task_inference mode", mode, _MODES)))
    if not snapshot.healthy_tasks():  # the server's data, not the request: retryable once a poll restores a task
        broken = ", ".join(str(t.entry.id) for t in snapshot.out_of_service())
        raise ModelUnavailable(f"model '{snapshot.model}' has no task in service to infer from: " + (
            f"task(s) {broken} are out of service (a blob missing or corrupt; ListTasks says which); polls retry "
            "them, at growing intervals up to a minute" if broken else "its manifest lists no task"))
    logits_of = logits_of or snapshot.logits_of
    if mode in _REQUIREMENTS:
        _require(mode, snapshot)
    choice = _MODES[mode](snapshot, x, logits_of) if mode == "exhaustive" else _MODES[mode](snapshot, x, logits_of, shortlist)
    if choice.scores and math.isinf(min(choice.scores.values())):  # no finite score: nothing to rank by
        raise InvalidRequest(f"task_inference '{mode}' found no finite score on model '{snapshot.model}' for this input: "
                             f"the network overflows on it (its largest magnitude is {float(x.abs().max()):.3g}); "
                             "send inputs on the scale of the model's training data")
    return choice


@register_mode("exhaustive")
def exhaustive(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf) -> TaskChoice:
    outputs = logits_of(snapshot.healthy_tasks(), x)
    scores = _entropies(outputs)
    best = min(scores, key=lambda i: (scores[i], i))
    return TaskChoice(snapshot.tasks[best], "exhaustive", scores, outputs[best])


def _entropies(outputs: dict[int, torch.Tensor]) -> dict[int, float]:
    """Each task's mean output entropy, by task id. The outputs of one shape (one class count) are
    stacked and their entropies taken in a few PyTorch calls, read back in one transfer each: per task,
    those calls cost more than their arithmetic (at 100 tasks of MLP 64-128-128-10, batch 16, they
    were 2.1 of exhaustive's 7.3 ms)."""
    groups: dict[torch.Size, list[int]] = {}
    for task, logits in outputs.items():
        groups.setdefault(logits.shape, []).append(task)
    scores: dict[int, float] = {}
    for tasks in groups.values():
        scores.update(zip(tasks, _scores(mean_entropy(torch.stack([outputs[t] for t in tasks])))))
    return {task: scores[task] for task in outputs}


def _superposition_problem(snapshot: Snapshot) -> str | None:
    """Why the superposition modes (oneshot, binary) cannot run on `snapshot`, or None."""
    if snapshot.mask_stack() is None:
        return ("needs mask-based tasks on one backbone version without per-task BatchNorm statistics (SupSup "
                "without BatchNorm; ExSSNeT trains the backbone, a version per task; ImpressLearn's real-valued "
                "masks have alpha instead)")
    return None


def _basis_problem(snapshot: Snapshot) -> str | None:
    """Why basis task inference (alpha) cannot run on `snapshot`, or None."""
    ids, _ = snapshot.alpha_stack()
    if not ids or len(ids) != len(snapshot.healthy_tasks()) or len(_backbones(snapshot)) != 1:
        return "needs ImpressLearn tasks (alpha over shared basis masks) on one backbone"
    return None


_REQUIREMENTS: dict[str, Callable[[Snapshot], str | None]] = {
    "oneshot": _superposition_problem, "oneshot-input": _superposition_problem, "binary": _superposition_problem,
    "alpha": _basis_problem,
}


def usable_modes(snapshot: Snapshot) -> list[str]:
    """The task-inference modes that can run on this model (exhaustive always can)."""
    return [m for m in mode_names() if m not in _REQUIREMENTS or _REQUIREMENTS[m](snapshot) is None]


def default_or_exhaustive(snapshot: Snapshot, mode: str) -> str:
    """`mode`, a server's default, where it can run on `snapshot`, else `exhaustive` (which always
    can): a server-wide `--task-inference oneshot` must not make every request that names no mode
    fail on the server's SPG models. A mode a request names is never replaced."""
    problem = _REQUIREMENTS.get(mode)
    return mode if problem is None or problem(snapshot) is None else "exhaustive"


def _require(mode: str, snapshot: Snapshot) -> None:
    """InvalidRequest naming the modes that work, unless `mode` can run on `snapshot`."""
    problem = _REQUIREMENTS[mode](snapshot)
    if problem is not None:
        methods = ", ".join(sorted({t.entry.method for t in snapshot.healthy_tasks()}))
        usable = [f"'{m}'" for m in usable_modes(snapshot)]
        choices = f"{', '.join(usable[:-1])} or {usable[-1]}" if len(usable) > 1 else usable[0]
        raise InvalidRequest(f"task_inference '{mode}' {problem}; model '{snapshot.model}' has {methods} tasks: "
                             f"use {choices}")


def _backbones(snapshot: Snapshot) -> set[str]:
    return {t.entry.backbone for t in snapshot.healthy_tasks()}


def superposition_gradient(snapshot: Snapshot, x: torch.Tensor, candidates: list[int],
                           input_layer_only: bool = False) -> dict[int, float]:
    """dH/dalpha_i for the candidates' masks superposed with equal weights (SupSup's one-shot signal).
    With `input_layer_only`, alpha weights only the first masked layer's masks; the other layers
    keep the same uniform superposition but pass no gradient to alpha (same forward, other signal).
    One backward pass to the effective weights, then one product with the stacked masks
    (serving/superposition.py)."""
    stack = snapshot.mask_stack()
    tasks = stack.subset(None if candidates == stack.ids else [stack.row[i] for i in candidates])
    layers = list(stack.columns)[:1] if input_layer_only else list(stack.columns)
    gradients = snapshot.entropy_gradients(tasks.parameters, x, tasks.classes, layers)
    gradient = stack.gradient(tasks, {name: g.cpu() for name, g in gradients.items()})  # the masks are on the CPU
    return dict(zip(candidates, _scores(gradient)))


def _shortlisted(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf, candidates: list[int], mode: str,
                 scores: dict[int, float], shortlist: int) -> TaskChoice:
    """The candidate with the lowest score (ties: the lowest id), or, with shortlist k > 1, the
    lowest-entropy task among the k best scored (k forward passes: a cost bounded by k, not by
    the number of tasks). Every candidate has a score (each mode scores all it ranks)."""
    # (score, id) pairs ranked by C-level tuple comparison: a key function per candidate took twice as long
    keyed = zip(map(scores.__getitem__, candidates), candidates)
    ranked = [min(keyed)[1]] if shortlist <= 1 else [i for _, i in heapq.nsmallest(shortlist, keyed)]
    if len(ranked) == 1:
        return TaskChoice(snapshot.tasks[ranked[0]], mode, scores)
    outputs = logits_of([snapshot.tasks[i] for i in ranked], x)
    entropy = _entropies(outputs)
    best = min(entropy, key=lambda i: (entropy[i], i))
    return TaskChoice(snapshot.tasks[best], mode, scores, outputs[best])


@register_mode("oneshot", gradients=True)
def oneshot(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf, shortlist: int = 1) -> TaskChoice:
    """One gradient over all tasks superposed; the most negative wins (SupSup)."""
    ids = snapshot.mask_stack().ids
    scores = superposition_gradient(snapshot, x, ids)
    return _shortlisted(snapshot, x, logits_of, ids, "oneshot", scores, shortlist)


@register_mode("oneshot-input", gradients=True)
def oneshot_input(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf, shortlist: int = 1) -> TaskChoice:
    """`oneshot` with the gradient through the first masked layer only (the most negative wins)."""
    ids = snapshot.mask_stack().ids
    scores = superposition_gradient(snapshot, x, ids, input_layer_only=True)
    return _shortlisted(snapshot, x, logits_of, ids, "oneshot-input", scores, shortlist)


@register_mode("binary", gradients=True)
def binary(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf, shortlist: int = 1) -> TaskChoice:
    """SupSup's multi-shot rule: each round keeps the tasks whose gradient is at or below the
    median and superposes them again, until one (or `shortlist`) remain: about log2(T) rounds."""
    candidates = list(snapshot.mask_stack().ids)
    gradient = superposition_gradient(snapshot, x, candidates)  # the first round's: every task gets a score,
    scores = dict(gradient)  # even where no round narrows anything (a shortlist as long as the task list)
    while len(candidates) > max(1, shortlist):
        ranked = sorted(candidates, key=lambda i: (gradient[i], i))
        # The lower median keeps the same tasks as the mean of the two middle values (numpy's
        # median, 0.1 ms a call): no gradient lies strictly between those two.
        median = gradient[ranked[(len(ranked) - 1) // 2]]
        keep = [i for i in ranked if gradient[i] <= median]
        kept = len(keep) if len(keep) < len(candidates) else max(1, len(candidates) // 2)
        candidates = ranked[: max(kept, shortlist)]  # never fewer than the shortlist: it is the k best, checked
        if len(candidates) > max(1, shortlist):
            gradient = superposition_gradient(snapshot, x, candidates)
            scores.update(gradient)
    return _shortlisted(snapshot, x, logits_of, candidates, "binary", scores, shortlist)


@register_mode("alpha")
def alpha(snapshot: Snapshot, x: torch.Tensor, logits_of: LogitsOf, shortlist: int = 1) -> TaskChoice:
    """ImpressLearn basis-GN: the alpha over the B basis masks that makes the network most confident
    on the batch, then the tasks ranked by how far their alpha is from it.

    The lowest-entropy alpha is searched at the simplex's vertices, one forward pass per basis
    mask (B of them, however many tasks): gradient descent from uniform alpha was measured to stop
    at mixed masks (bench/gn_basis.py). Scores: the squared distance, summed over layers, between a
    task's alpha and the chosen mask's one-hot alpha (lower wins; 0 for the task that owns it), the
    nearest chosen mask's where the input leaves several equally confident.
    """
    ids, stack = snapshot.alpha_stack()
    first = snapshot.tasks[ids[0]].entry
    classes = max(snapshot.tasks[i].entry.num_classes for i in ids)
    size = next(iter(stack.values())).shape[1]
    with torch.no_grad():
        entropy = _scores(torch.stack([
            mean_entropy(snapshot.forward(snapshot.basis_parameters(first.method, first.backbone, b), x)[:, :classes])
            for b in range(size)]))  # a basis mask the input overflows ranks last, as any non-finite score
    # Basis masks the input leaves tied (all zeros: every logit 0) are all chosen: a task's score is its distance
    # to the nearest of them, so their tasks tie at 0 (task_ties says so) rather than the lowest id's look certain.
    best = min(entropy)
    targets = F.one_hot(torch.tensor([b for b in range(size) if entropy[b] == best]), size).to(torch.float32)  # [k, B]
    distance = sum(((layer[None] - targets[:, None]) ** 2).sum(dim=2) for layer in stack.values()).min(dim=0).values
    scores = dict(zip(ids, _scores(distance)))
    return _shortlisted(snapshot, x, logits_of, ids, "alpha", scores, shortlist)
