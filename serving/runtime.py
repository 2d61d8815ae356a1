"""The inference entry point of the runtime: protocol-free, so any front end can call it."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends import Backend, PyTorchBackend
from .batcher import DynamicBatcher, LoopBatcher
from .errors import InvalidRequest
from .snapshot import LoadedTask, Snapshot
from .statistics import Timing
from .task_inference import infer_task, needs_gradients

PYTORCH = PyTorchBackend()

# Inputs decoded from a request's raw bytes are read-only numpy views of them (no copy), and nothing
# writes to an input tensor; PyTorch's warning about such tensors, which a server printed at its first
# request, is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass(frozen=True)
class InferenceResult:
    snapshot: Snapshot
    task: LoadedTask
    logits: np.ndarray  # float32 [N, classes of the task]
    mode: str  # 'given', or the task-inference mode that chose the task
    backend: str  # the backend that computed the logits: 'pytorch' or 'onnxruntime'
    scores: dict[int, float] | None = None
    timing: Timing = field(default_factory=Timing)  # its queue wait and compute time, for its statistics


def check_input(snapshot: Snapshot, x: np.ndarray) -> torch.Tensor:
    """Validate a batch against the model's input and return it as a tensor."""
    expected = (-1, *snapshot.manifest.input_shape)
    if x.ndim != len(expected) or x.shape[0] < 1 or tuple(x.shape[1:]) != expected[1:]:
        raise InvalidRequest(f"input has shape {list(x.shape)}; model '{snapshot.model}' expects {list(expected)} (N >= 1)")
    finite = np.isfinite(x)
    if not finite.all():
        where = np.argwhere(~finite)[0].tolist()
        raise InvalidRequest(f"input contains {int((~finite).sum())} NaN or infinite value(s), the first at index {where}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def check_output(snapshot: Snapshot, task: LoadedTask, inputs: torch.Tensor, logits: np.ndarray) -> np.ndarray:
    """`logits`, unless the network overflowed on these inputs (finite, but too large): then InvalidRequest,
    not NaN answered as a success."""
    if not np.isfinite(logits).all():
        row = int(np.argwhere(~np.isfinite(logits))[0][0])
        raise InvalidRequest(f"task {task.entry.id} of model '{snapshot.model}' computes non-finite outputs for this "
                             f"input (the first in row {row}): the network overflows on it (its largest magnitude is "
                             f"{float(inputs.abs().max()):.3g}); send inputs on the scale of the model's training data")
    return logits


def infer(
    snapshot: Snapshot,
    x: np.ndarray,
    *,
    task: int | str | None = None,
    mode: str = "exhaustive",
    batcher: DynamicBatcher | None = None,
    shortlist: int = 1,
    backend: Backend = PYTORCH,
    arrived_ns: int | None = None,
) -> InferenceResult:
    """Run `x` through `task` of the snapshot's model, or through the task that `mode` infers when task is None.
    With a batcher, task-given requests run batched with concurrent ones for the same task, and the
    statistics count queue time from `arrived_ns` (time.perf_counter_ns() when the request arrived;
    default: this call), so that a wait for the compute pool is queue time, as in Triton.
    Forwards run on `backend`, except task inference by gradients, which always runs on PyTorch."""
    model, timing = snapshot.model, Timing()
    inputs = check_input(snapshot, x)
    if task is not None:
        chosen, run = given_task(snapshot, task, backend)
        logits = run(inputs) if batcher is None else batcher.run(model, (id(snapshot), chosen.key), inputs, run, arrived_ns,
                                                                 timing)
        return InferenceResult(snapshot, chosen, check_output(snapshot, chosen, inputs, logits.numpy()), "given",
                               backend.name, timing=timing)
    if needs_gradients(mode):
        backend = PYTORCH
    started = time.perf_counter_ns()
    choice = infer_task(mode, snapshot, inputs, shortlist, lambda tasks, batch: backend.logits_of(snapshot, tasks, batch))
    logits = choice.logits if choice.logits is not None else backend.logits(snapshot, choice.task, inputs)
    timing.queue_ns = 0 if arrived_ns is None else max(0, started - arrived_ns)
    timing.compute_ns = time.perf_counter_ns() - started
    if batcher is not None:
        batcher.statistics.execution(model, len(inputs), timing.compute_ns)
    return InferenceResult(snapshot, choice.task, check_output(snapshot, choice.task, inputs, logits.cpu().numpy()),
                           choice.mode, backend.name, choice.scores, timing)


async def infer_on_loop(snapshot: Snapshot, x: np.ndarray, task: int | str, batcher: LoopBatcher, max_rows: int,
                        backend: Backend = PYTORCH) -> InferenceResult:
    """`infer` of a task-given request on the calling event loop, batched by `batcher` into forwards
    of at most `max_rows` rows: for requests small enough that handing them to a thread would cost
    more than computing them."""
    inputs, timing = check_input(snapshot, x), Timing()
    chosen, run = given_task(snapshot, task, backend)
    logits = await batcher.run(snapshot.model, (id(snapshot), chosen.key), inputs, run, max_rows, timing)
    return InferenceResult(snapshot, chosen, check_output(snapshot, chosen, inputs, logits.numpy()), "given", backend.name,
                           timing=timing)


def given_task(snapshot: Snapshot, task: int | str, backend: Backend):
    """The task `task` names, and the forward of a batch through it on `backend`."""
    chosen = snapshot.task(task)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return backend.logits(snapshot, chosen, batch).cpu()  # from the snapshot's device, for the batcher to split

    return chosen, run
