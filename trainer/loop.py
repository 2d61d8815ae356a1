"""The training loop: learn tasks one after another and publish each one as soon as it is learned.

Running it on a model that already exists appends tasks: the backbone and the published tasks are
read back from the registry and never retrained, and the settings stored in the manifest are
reused (an explicit setting that contradicts them is an error, because task i depends only on
(settings, seed, i): two runs of 3 + 2 tasks publish the same model as one run of 5).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from registry import (
    BackboneVersion,
    BlobRef,
    Manifest,
    Registry,
    TaskEntry,
    build_architecture,
    effective_parameters,
    forward,
    served_backbone,
)
from registry.architectures import resolved_spec
from registry.errors import MaskbankError

from . import metrics
from .fit import TrainingDiverged
from .methods import Method, PublishedTask, TaskArtifact, TrainingContext, get_method, refuse_inert
from .record import training_record
from .streams import TaskData, TaskStream, get_stream, reads_files

BACKBONE_VERSION = "1"
_BACKBONE_SEED_KEY = 1 << 30  # keeps the backbone's random stream apart from every task's


class TrainingError(MaskbankError):
    """The training request cannot be carried out as asked."""


@dataclass(frozen=True)
class TrainSettings:
    """What determines a model's tasks; stored in the manifest so appends can reuse it."""

    method: str
    stream: str
    seed: int = 0
    architecture: dict[str, Any] = field(default_factory=dict)
    method_config: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None  # where torchvision streams read files; machine-specific, may change


def default_architecture(stream: TaskStream) -> dict[str, Any]:
    return {"arch": "mlp", "sizes": [int(np.prod(stream.input_shape)), 512, 512, stream.num_classes]}


def check_fits(module: torch.nn.Module, architecture: dict[str, Any], stream: TaskStream, new: bool = True) -> None:
    """TrainingError unless `module` takes the stream's examples and has an output for each of its
    classes; otherwise the mismatch surfaces as a shape error (or an out-of-range label) deep in the
    first epoch, after the model's backbone is already in the registry. A `new` model's conv net must
    also read them as the stream's images; a published one keeps the shape it was trained with."""
    features = int(np.prod(stream.input_shape))
    images = f" (images of {'x'.join(map(str, stream.image_shape))})" if stream.image_shape else ""
    spec = json.dumps(architecture)
    shape = architecture.get("input_shape")
    if new and stream.image_shape and shape is not None and tuple(shape) != tuple(stream.image_shape):
        raise TrainingError(f"architecture {spec} reads the examples as {'x'.join(map(str, shape))} images, but stream "
                            f"'{stream.name}' has images of {'x'.join(map(str, stream.image_shape))} (channels x height "
                            f"x width): give \"input_shape\": {list(stream.image_shape)}")  # same size, scrambled pixels
    training = module.training
    try:
        with torch.no_grad():
            outputs = module.eval()(torch.zeros(2, *stream.input_shape)).shape[1]
    except RuntimeError as error:
        raise TrainingError(f"architecture {spec} does not take stream '{stream.name}': its examples are "
                            f"{features} features{images}, so its input size must be {features} (\"sizes\"[0] of an "
                            f"mlp, \"in_features\" of lenet300-100, \"input_shape\" of the image networks) "
                            f"({error})") from None
    finally:
        module.train(training)
    if outputs < stream.num_classes:
        raise TrainingError(f"architecture {spec} has {outputs} outputs, but the tasks of stream '{stream.name}' "
                            f"have up to {stream.num_classes} classes: make its last layer at least that wide")


_FLAGS = {"architecture": "--arch"}  # settings whose command-line flag is not --NAME


def _same_setting(key: str, stored: Any, given: Any) -> bool:
    """Whether a setting given on append is the model's: an architecture spelled out with its defaults
    (`"bn": "none"`) is the same architecture."""
    if key == "architecture" and isinstance(stored, dict) and isinstance(given, dict):
        try:
            return json.dumps(resolved_spec(stored), sort_keys=True) == json.dumps(resolved_spec(given), sort_keys=True)
        except (MaskbankError, TypeError, ValueError):  # a spec that does not build is not the model's
            return False
    return stored == given


def resolve_settings(manifest: Manifest | None, requested: dict[str, Any]) -> TrainSettings:
    """Combine explicit settings (None = not given) with those stored in an existing model."""
    given = {k: v for k, v in requested.items() if v is not None}
    config_given = {k: v for k, v in (requested.get("method_config") or {}).items() if v is not None}
    given.pop("method_config", None)
    data_root = given.pop("data_root", None)
    if manifest is None:
        for required in ("method", "stream"):
            if required not in given:
                raise TrainingError(f"--{required} is required to create a new model")
        stream = get_stream(given["stream"], given.get("seed", 0), data_root)
        method = get_method(given["method"], **config_given)
        refuse_inert(method, config_given)
        return TrainSettings(
            method=method.name,
            stream=stream.name,
            seed=stream.seed,
            architecture=given.get("architecture") or default_architecture(stream),
            method_config=asdict(method.config),
            data_root=data_root if reads_files(stream.name) else None,  # a path the model never used is not kept
        )
    training = training_record(manifest)
    if training is None:  # KeyError traceback before
        raise TrainingError(f"model '{manifest.model}' has no training settings (it was published by a program of its "
                            "own, not `maskbank train`), so tasks cannot be appended to it: train a new model")
    if (measured := len(training["accuracy_matrix"])) < len(manifest.tasks):
        raise TrainingError(f"model '{manifest.model}' has {len(manifest.tasks)} tasks but its training record measured "
                            f"{measured}: the others were published without `maskbank train` (through the registry's "
                            "API), and the trainer would score them on stream tasks they never learned: train a new model")
    stored = training["settings"]
    if "architecture" in given and not _same_setting("architecture", stored.get("architecture"), given["architecture"]):
        with torch.device("meta"):  # checked, not allocated: a spec that cannot be built is said as such, not as a clash
            build_architecture(given["architecture"])
    clashes = [f"{_FLAGS.get(k, '--' + k.replace('_', '-'))} {v!r} (model has {stored.get(k)!r})"
               for k, v in given.items() if not _same_setting(k, stored.get(k), v)]
    if given.get("method", stored["method"]) == stored["method"]:  # options of another method are that clash's
        get_method(stored["method"], **config_given)  # an option the model's method does not take is an error
        clashes += [f"--set {k}={v if isinstance(v, str) else json.dumps(v)} "  # a form every option has (not all a flag)
                    f"(model has {stored['method_config'].get(k)!r})"
                    for k, v in config_given.items() if stored["method_config"].get(k) != v]
    if clashes:
        raise TrainingError(
            f"model '{manifest.model}' was trained with other settings; appended tasks must use the same "
            f"ones so published tasks stay reproducible: {'; '.join(clashes)}. Omit these options, "
            "or train a new model with --model."
        )
    refuse_inert(get_method(stored["method"], **stored["method_config"]), config_given)  # the model's, as given
    return TrainSettings(**{**stored, "data_root": data_root or stored.get("data_root")})


def task_generator(seed: int, *key: int) -> torch.Generator:
    """A torch generator seeded from (seed, *key), independent of any other task's."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def accuracy(module, method: str, backbone, parts, shared, task: TaskData) -> float:
    """Test accuracy of one task computed exactly as the server computes it (registry materialisation)."""
    module.eval()
    with torch.no_grad():
        params = effective_parameters(method, backbone, parts, shared)
        logits = forward(module, params, task.x_test)[:, : task.num_classes]
    return float((logits.argmax(dim=1) == task.y_test).float().mean())


@dataclass
class _Model:
    """The published model in memory: what the loop extends, evaluates and publishes next."""

    manifest: Manifest | None
    backbones: dict[str, dict]  # version -> weights
    backbone_refs: dict[str, BackboneVersion]
    shared: dict[str, dict]
    shared_refs: dict[str, BlobRef]
    tasks: list[PublishedTask]
    matrix: list[list[float]]
    alone: list[float | None]  # each task's accuracy when trained alone (the FWT reference), if measured
    evaluated: dict[tuple[int, str], float]  # (task id, backbone version it ran on) -> test accuracy

    codec: str | None = None  # a new model's backbone codec: its first version is written with its first task

    @property
    def latest(self) -> str:
        return max(self.backbones, key=int)


def _new_model(method: Method, module, seed: int) -> _Model:
    """A model not yet published. Its backbone is written with the first task, so that a first task
    that fails (a diverged loss, an option the network cannot take, Ctrl-C) leaves no blob behind."""
    backbone = method.create_backbone(module, task_generator(seed, _BACKBONE_SEED_KEY))
    return _Model(None, {BACKBONE_VERSION: backbone}, {}, {}, {}, [], [], [], {}, method.backbone_codec)


def _load_model(registry: Registry, manifest: Manifest) -> _Model:
    tasks = [
        PublishedTask(t.id, t.name, t.num_classes, t.backbone, {k: registry.load(r) for k, r in t.parts.items()},
                      {k: registry.load(r) for k, r in t.state.items()}, t.shares)
        for t in manifest.tasks
    ]
    backbones = {v: registry.load_backbone(manifest, v) for v in manifest.backbones}
    last_row = manifest.training["accuracy_matrix"][-1]  # measured on the versions the tasks run on now
    evaluated = {(t.id, served_backbone(t.method, t.backbone, backbones)): a for t, a in zip(manifest.tasks, last_row)}
    return _Model(
        manifest=manifest,
        backbones=backbones,
        backbone_refs=dict(manifest.backbones),
        shared={k: registry.load(r) for k, r in manifest.shared.items()},
        shared_refs=dict(manifest.shared),
        tasks=tasks,
        matrix=[list(row) for row in manifest.training["accuracy_matrix"]],
        alone=[t.metrics.get("alone_accuracy") for t in manifest.tasks],
        evaluated=evaluated,
    )


def _check_publishable(desc: str, artifact: TaskArtifact) -> None:
    """TrainingDiverged unless every floating tensor and number the artifact would publish is finite:
    the last guard for loops that do not check as they go (a NaN alpha served garbage, and a NaN metric
    made the manifest and `report --json` invalid JSON)."""
    groups = {"part": artifact.parts, "shared part": artifact.shared, "state": artifact.state,
              "backbone": {"weights": artifact.backbone or {}}}
    for what, kinds in groups.items():
        for kind, tensors in kinds.items():
            bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise TrainingDiverged(f"{desc}: its {what} '{kind}' holds values that are not finite numbers "
                                       f"({', '.join(bad)}): training diverged; lower the learning rate")
    bad = [name for name, value in artifact.metrics.items() if not _finite_values(value)]
    if bad:
        raise TrainingDiverged(f"{desc}: its metrics {bad} are not finite numbers: training diverged; lower the "
                               "learning rate")


def _finite_values(value: Any) -> bool:
    """Whether every number in a metric (a number, or lists and dicts of them) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite_values, value))
    if isinstance(value, dict):
        return all(map(_finite_values, value.values()))
    return True


def _store_artifact(registry: Registry, model: _Model, artifact: TaskArtifact) -> tuple[str, dict, dict]:
    """Write the artifact's new backbone version, shared parts, parts and state; return
    (backbone version of the task, part refs, state refs)."""
    version = model.latest
    if BACKBONE_VERSION not in model.backbone_refs:
        model.backbone_refs[BACKBONE_VERSION] = registry.put_backbone(model.backbones[BACKBONE_VERSION], model.codec)
    if artifact.backbone is not None:
        previous, version = version, str(int(version) + 1)
        model.backbone_refs[version] = registry.put_backbone(artifact.backbone, base=(previous, model.backbones[previous]))
        model.backbones[version] = artifact.backbone
    backbone = model.backbones[version]
    for kind, tensors in artifact.shared.items():
        model.shared_refs[kind] = registry.put_part(kind, tensors, backbone)
        model.shared[kind] = tensors
    parts = {kind: registry.put_part(kind, tensors, backbone) for kind, tensors in artifact.parts.items()}
    state = {name: registry.put("tensors/v1", tensors) for name, tensors in artifact.state.items()}
    return version, parts, state


def _evaluate(model: _Model, module, method: str, stream: TaskStream) -> list[float]:
    """Every task's test accuracy now, as served. A task evaluated before on the backbone version it
    runs on now computes exactly what it did then, so its accuracy is reused: for methods whose tasks
    keep their own version this makes evaluation O(T) per task, not O(T^2) in total."""
    row = []
    for t in model.tasks:
        key = (t.id, served_backbone(method, t.backbone, model.backbones))
        if key not in model.evaluated:
            model.evaluated[key] = accuracy(module, method, model.backbones[key[1]], t.parts, model.shared, stream.task(t.id))
        row.append(model.evaluated[key])
    return row


def accuracy_alone(method: Method, settings: TrainSettings, task: TaskData) -> float:
    """Accuracy of `method` trained on `task` alone, from a fresh backbone: SPG's FWT reference."""
    module = build_architecture(settings.architecture)
    backbone = method.create_backbone(module, task_generator(settings.seed, _BACKBONE_SEED_KEY))
    context = TrainingContext(settings.architecture, backbone, [], {})
    artifact = method.learn_task(build_architecture(settings.architecture), task, task_generator(settings.seed, task.index), context)
    trained = backbone if artifact.backbone is None else artifact.backbone
    return accuracy(module, method.name, trained, artifact.parts, artifact.shared, task)


def _warm_up_optimizers() -> None:
    """One step of a throwaway optimizer: PyTorch's first optimizer step in a process costs about a
    second of one-time set-up (its imports), which belongs to no task's train_seconds."""
    weight = torch.zeros(1, requires_grad=True)
    weight.sum().backward()
    torch.optim.SGD([weight], lr=0.0).step()


def train(
    registry: Registry,
    model: str,
    tasks: int,
    requested: dict[str, Any],
    log: Callable[[str], None] = functools.partial(print, flush=True),  # each line as it happens, piped or not
    fwt: bool = False,
) -> Manifest:
    """Learn tasks until `model` has `tasks` of them, publishing a new generation after each.
    With `fwt`, each task is also trained alone to measure forward transfer."""
    if tasks < 1:
        raise TrainingError(f"a model needs at least 1 task, not {tasks}")
    manifest = registry.find_manifest(model)
    if manifest is None and (missing := [f"--{key}" for key in ("method", "stream") if requested.get(key) is None]):
        models = registry.published_models()  # a mistyped --model or --registry reads as a new model
        raise TrainingError(f"registry {registry.location} has no model '{model}' "
                            f"({'models: ' + ', '.join(models) if models else 'no models yet'}); to create it, give "
                            f"{' and '.join(missing)}")
    settings = resolve_settings(manifest, requested)
    stream = get_stream(settings.stream, settings.seed, settings.data_root)
    if requested.get("data_root") and not reads_files(stream.name):
        log(f"note: --data-root {requested['data_root']} is not used: stream '{stream.name}' is built in, with no "
            "files to read")
    method = get_method(settings.method, **settings.method_config)
    module = build_architecture(settings.architecture)
    check_fits(module, settings.architecture, stream, new=manifest is None)
    if tasks > stream.max_tasks:
        raise TrainingError(f"stream '{stream.name}' has only {stream.max_tasks} tasks, not {tasks}")
    if manifest is None or len(manifest.tasks) < tasks:  # a read-only registry may still say "nothing to train"
        registry.check_writable(model)  # a file in its path, a read-only folder: before training, not after a task
    state = _load_model(registry, manifest) if manifest else _new_model(method, module, settings.seed)
    start = len(state.tasks)
    if start >= tasks:
        log(f"model '{model}' already has {start} task(s); nothing to train (ask for --tasks > {start} to append)")
        return manifest
    _warm_up_optimizers()
    for index in tqdm(range(start, tasks), desc=f"training '{model}'", unit="task", disable=None):
        task = stream.task(index)
        context = TrainingContext(settings.architecture, state.backbones[state.latest], list(state.tasks), dict(state.shared))
        began = time.perf_counter()
        artifact = method.learn_task(build_architecture(settings.architecture), task, task_generator(settings.seed, index), context)
        seconds = time.perf_counter() - began
        _check_publishable(f"task {index} ({task.name})", artifact)
        version, parts, task_state = _store_artifact(registry, state, artifact)
        state.tasks.append(PublishedTask(index, task.name, task.num_classes, version, artifact.parts, artifact.state, artifact.shares))
        row = _evaluate(state, module, method.name, stream)
        state.matrix.append(row)
        state.alone.append(accuracy_alone(method, settings, task) if fwt else None)
        # the thread count is provenance: rebuilding a lost blob bit for bit needs the same one (README)
        task_metrics = {"accuracy": row[index], "train_seconds": round(seconds, 3),
                        "train_threads": torch.get_num_threads(), **artifact.metrics}
        if fwt:
            task_metrics["alone_accuracy"] = state.alone[-1]
        entry = TaskEntry(
            id=index, name=task.name, method=method.name, backbone=version, num_classes=task.num_classes, parts=parts,
            metrics=task_metrics, shares=artifact.shares, state=task_state, labels=task.labels,
        )
        training = {"settings": asdict(settings), "accuracy_matrix": state.matrix,
                    **metrics.summary(state.matrix, state.alone)}
        if manifest is None:
            manifest = Manifest(model=model, generation=1, architecture=settings.architecture, input_shape=stream.input_shape,
                                backbones=dict(state.backbone_refs), tasks=(entry,), training=training, shared=dict(state.shared_refs))
        else:
            manifest = manifest.next(tasks=(*manifest.tasks, entry), training=training,
                                     backbones=dict(state.backbone_refs), shared=dict(state.shared_refs))
        registry.commit(manifest)
        log(f"published task {index} ({task.name}) as generation {manifest.generation}: "
            f"test accuracy {row[index]:.3f} ({seconds:.1f}s)")
    return manifest
