"""ONNX export: one graph per architecture, a task's effective weights supplied from outside.

Every architecture is a plain module whose parameters and BatchNorm statistics are exactly the
names `effective_parameters` returns, so one traced graph serves every task of every method:

- `architecture_graph(spec)`: the traced graph; each weight is an initializer named as in the
  module (`fc0.weight`, `layer1.0.bn1.running_mean`, ...), holding the module's own initial
  values as placeholders for a task's.
- `weights_as_inputs(graph)`: the same graph with every weight a graph input instead (no values):
  the shared backbone file, fed a task's weights at run time by any ONNX consumer.
- `self_contained(graph, weights, num_classes)`: one task's standalone model (its weights as
  initializers, its logits cut to its class count), for tools that take one file per model.

The graph is traced with torch's TorchScript exporter (`dynamo=False`: deterministic and offline),
without constant folding, which would fold BatchNorm into the preceding convolution and so bake one
task's statistics into the shared graph. The batch dimension is dynamic.

`export_onnx` writes a registry model's tasks as files; serving/triton_export.py builds on the same
functions, and so does the ONNX Runtime backend (serving/onnx_backend.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import safetensors.numpy
import torch
from onnx import helper, numpy_helper

from .architectures import build_architecture, input_features
from .catalog import Registry
from .errors import BlobCorrupt, BlobNotFound, BlobUnreadable, ExportError, InvalidArtifact, UnknownName
from .folders import make_folder, staging_folder
from .manifest import Manifest, TaskEntry
from .materialize import effective_parameters, served_backbone
from .progress import Progress, no_progress
from .storage import LocalStorage

OPSET = 17
INPUT = "input"
OUTPUT = "logits"
BATCH = "batch"
INDEX = "export.json"  # lists the export's model, layout and task files
LAYOUTS = ("shared", "self-contained")  # per task: weights for backbone.onnx, or a standalone model


def architecture_graph(spec: Mapping[str, Any]) -> onnx.ModelProto:
    """The architecture's forward pass as ONNX: `input` FP32 [batch, features] -> `logits` FP32
    [batch, num_classes], every weight an initializer named after the module's parameter or buffer."""
    module = build_architecture(spec).eval()
    example = torch.zeros(2, input_features(spec))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
        warnings.simplefilter("ignore")
        # Weights kept as inputs while exporting: otherwise the exporter merges initializers of equal
        # value (every BatchNorm's initial zero means of one width) into one, and tasks could not
        # give each its own statistics. They become plain initializers below.
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, do_constant_folding=False,
                          keep_initializers_as_inputs=True, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}})
    graph = onnx.load_from_string(buffer.getvalue())
    _keep_only_the_data_input(graph)
    graph.doc_string = f"maskbank architecture {dict(spec)}"
    expected = {name for name, _ in module.named_parameters()} | {
        name for name, _ in module.named_buffers() if not name.endswith("num_batches_tracked")}
    if set(weight_names(graph)) != expected:
        raise InvalidArtifact(f"the ONNX graph of {dict(spec)} has weights {sorted(weight_names(graph))}, "
                              f"the module {sorted(expected)}")
    return graph


def _keep_only_the_data_input(model: onnx.ModelProto) -> None:
    """Drop every graph input but `input` (the weights stay as initializers, if the model has them)."""
    inputs = [i for i in model.graph.input if i.name == INPUT]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def weight_names(graph: onnx.ModelProto) -> list[str]:
    """The names of the weights a task must supply, in graph order."""
    inputs = [i.name for i in graph.graph.input if i.name != INPUT]
    return [t.name for t in graph.graph.initializer] + inputs


def onnx_weights(graph: onnx.ModelProto, params: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A task's effective parameters as the float32 arrays the graph's weights take, checked by
    name and shape (BatchNorm's batch counters, which inference never reads, are left out)."""
    shapes = _weight_shapes(graph)
    if missing := sorted(set(shapes) - set(params)):
        raise InvalidArtifact(f"the effective parameters lack {missing}, which the ONNX graph needs")
    arrays = {}
    for name, shape in shapes.items():
        array = np.ascontiguousarray(params[name].detach().cpu().numpy(), dtype=np.float32)
        if array.shape != shape:
            raise InvalidArtifact(f"weight '{name}' has shape {list(array.shape)}, the ONNX graph {list(shape)}")
        arrays[name] = array
    return arrays


def _weight_shapes(graph: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    for value in graph.graph.input:
        if value.name != INPUT:
            shapes[value.name] = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
    return shapes


def weights_as_inputs(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every weight initializer turned into a graph input of the same name and shape."""
    shared = onnx.ModelProto()
    shared.CopyFrom(graph)
    weights = list(shared.graph.initializer)
    del shared.graph.initializer[:]
    shared.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)
    return shared


def without_weights(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without its placeholder weights: what `self_contained` copies per task (copying the
    placeholders too cost a copy of the network's weights per task)."""
    template = onnx.ModelProto()
    template.CopyFrom(graph)
    del template.graph.initializer[:]
    _keep_only_the_data_input(template)
    return template


def self_contained(graph: onnx.ModelProto, weights: Mapping[str, np.ndarray], num_classes: int) -> onnx.ModelProto:
    """One task's standalone model: `weights` (from `onnx_weights`) as initializers and the logits
    cut to the task's first `num_classes` outputs. `graph` may be `without_weights(graph)` (cheaper)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    del model.graph.initializer[:]
    _keep_only_the_data_input(model)
    for name, array in weights.items():  # each written once into the model (from_array then extend copied it twice)
        tensor = model.graph.initializer.add()
        tensor.name, tensor.data_type = name, onnx.TensorProto.FLOAT
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    _cut_logits(model, num_classes)
    return model


def _cut_logits(model: onnx.ModelProto, num_classes: int) -> None:
    """Rename the graph's logits and add `logits = all_logits[:, :num_classes]`."""
    (output,) = model.graph.output
    full = f"{OUTPUT}_all_classes"
    for node in model.graph.node:
        node.output[:] = [full if name == OUTPUT else name for name in node.output]
    bounds = {"starts": 0, "ends": num_classes, "axes": 1}
    model.graph.initializer.extend(numpy_helper.from_array(np.array([v], dtype=np.int64), f"{OUTPUT}_slice_{k}")
                                   for k, v in bounds.items())
    model.graph.node.append(helper.make_node("Slice", [full, *(f"{OUTPUT}_slice_{k}" for k in bounds)], [OUTPUT]))
    del model.graph.output[:]
    elem_type = output.type.tensor_type.elem_type
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT, elem_type, [BATCH, num_classes]))


def selected_tasks(manifest: Manifest, keys: Sequence[int | str] = ()) -> list[TaskEntry]:
    """The tasks `keys` names (ids or names; all when empty), in that order, each once however often
    it is named (an id and its name are one task). Unknown keys raise TaskNotFound naming the model's tasks."""
    if not keys:
        return list(manifest.tasks)
    entries = {}
    for key in keys:
        entry = manifest.task(key)
        entries.setdefault(entry.id, entry)
    return list(entries.values())


def task_weights(registry: Registry, manifest: Manifest,
                 keys: Sequence[int | str] = ()) -> Iterator[tuple[TaskEntry, dict[str, torch.Tensor]]]:
    """(task, effective parameters) for the tasks `keys` names (`selected_tasks`), each on the
    backbone version a server runs it on. Unknown keys raise TaskNotFound before any work is done."""
    entries = selected_tasks(manifest, keys)
    shared = {kind: registry.load(ref) for kind, ref in manifest.shared.items()}
    backbones: dict[str, dict[str, torch.Tensor]] = {}
    for entry in entries:
        version = served_backbone(entry.method, entry.backbone, manifest.backbones)
        if version not in backbones:
            backbones[version] = registry.load_backbone(manifest, version)
        try:
            parts = {kind: registry.load(ref) for kind, ref in entry.parts.items()}
        except (BlobNotFound, BlobCorrupt, BlobUnreadable) as error:  # say which task, and what still exports
            raise type(error)(f"task {entry.id} ({entry.name}) of model '{manifest.model}' cannot be exported: {error} "
                              "(the other tasks export when named with --task)") from error
        with torch.no_grad():
            yield entry, effective_parameters(entry.method, backbones[version], parts, shared)


def export_onnx(registry: Registry, model: str, out: str | Path, keys: Sequence[int | str] = (), *,
                layout: str = "shared", progress: Progress = no_progress) -> Path:
    """Write `model`'s newest generation as ONNX into the folder `out`; return the index file.

    `out/backbone.onnx` is always written: the graph with every weight a graph input. Per task,
    layout "shared" writes its weights (`tasks/ID.safetensors`, tensors named as the graph's
    inputs) and "self-contained" a standalone model (`tasks/ID.onnx`). `out/export.json` lists
    the tasks with their files. Every ONNX file passes `onnx.checker`. `progress(items, total)`
    may wrap the per-task loop (a progress bar).

    Every file is written into a staging folder inside `out` first, and moved into place only once
    all are written: an export that fails (a corrupt blob, Ctrl-C) leaves an earlier export as it was,
    and a folder with an `export.json` holds exactly the files it lists.
    """
    if layout not in LAYOUTS:
        raise UnknownName(f"Unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    manifest = registry.manifest(model)
    out = Path(out)
    check_outside_registry(registry, out)
    _earlier_export(out, manifest.model)  # refuses a folder this export must not write into, before making any
    graph = architecture_graph(manifest.architecture)
    created = make_folder(out, f"output folder {out}")
    with export_lock(out):
        earlier = _earlier_export(out, manifest.model)  # read under the lock: what the last export left
        for leftover in out.glob(f"{STAGING}*"):  # of an export killed while writing
            shutil.rmtree(leftover, ignore_errors=True)
        staging = staging_folder(out, STAGING)
        try:
            tasks = _write_tasks(registry, manifest, keys, graph, staging, layout, progress)
            _commit(out, staging, {"model": manifest.model, "generation": manifest.generation, "layout": layout,
                                   "architecture": manifest.architecture, "input": INPUT, "output": OUTPUT,
                                   "backbone": "backbone.onnx", "weights": weight_names(graph), "tasks": tasks}, earlier)
        except BaseException:  # a first export leaves nothing, so the same command can retry; a re-export, the earlier one
            shutil.rmtree(staging, ignore_errors=True)
            if not earlier:
                _remove_partial(out, created)
            raise
    return out / INDEX


STAGING = ".staging-"  # prefix of the folders exports write into before moving files in (ONNX and Triton)
COMMITTING = INDEX + ".committing"  # the new index while files move into place (no export.json meanwhile)


def _commit(out: Path, staging: Path, index: dict[str, Any], earlier: set[str]) -> None:
    """Move the staged files into `out` and write the index last. While files move, `out` has no
    export.json (no reader takes a mix of two exports for one) and the new index waits under
    COMMITTING, by which a re-export recognises the folder if this one is killed."""
    pending = out / COMMITTING
    stale = sorted(earlier - {task["file"] for task in index["tasks"]})
    # the earlier export's files this one drops, listed too: a re-export that takes over after a kill removes them
    pending.write_text(json.dumps({**index, "replaces": stale}, indent=2))
    (out / INDEX).unlink(missing_ok=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    for file in stale:
        (out / file).unlink(missing_ok=True)
    written = out / f"{INDEX}.partial"
    written.write_text(json.dumps(index, indent=2))
    written.replace(out / INDEX)  # atomic, and last: a reader finds export.json once its files are in place
    pending.unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _write_tasks(registry: Registry, manifest: Manifest, keys: Sequence[int | str], graph, out: Path, layout: str,
                 progress: Progress) -> list[dict[str, Any]]:
    """Write backbone.onnx and each task's file; return the index's task entries."""
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    save_checked(weights_as_inputs(graph), out / "backbone.onnx")
    tasks = []
    for entry, params in progress(task_weights(registry, manifest, keys), len(selected_tasks(manifest, keys))):
        weights = onnx_weights(graph, params)
        if layout == "shared":
            file = f"tasks/{entry.id}.safetensors"
            (out / file).write_bytes(safetensors.numpy.save(weights))  # save_file makes it 0600: unreadable to others
        else:
            file = f"tasks/{entry.id}.onnx"
            save_checked(self_contained(graph, weights, entry.num_classes), out / file)
        tasks.append({"id": entry.id, "name": entry.name, "method": entry.method, "num_classes": entry.num_classes,
                      "file": file})
    return tasks


def check_outside_registry(registry: Registry, out: Path) -> None:
    """ExportError if `out` is a local registry's own folder or inside it: its files are the registry's
    to manage, and Triton would take its folders (blobs/, models/) for models."""
    if not isinstance(registry.storage, LocalStorage):  # open_storage decides what is a local registry
        return
    root, target = registry.storage.root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise ExportError(f"{out} is inside registry {registry.location}: export into a folder outside it")


@contextlib.contextmanager
def export_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while an export writes into it (flock on the folder itself,
    so nothing is written for it), released when the export ends or its process dies. A second export
    into the same folder fails at once, saying so: it would have swept away the first one's staged
    files and mixed its own with them. Where the file system has no locks (some network mounts), the
    export goes on unlocked."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:  # made a moment ago, and removed by a failed export into it since
        raise ExportError(f"{folder} was removed as this export started (another export into it failed): run "
                          "this one again") from None
    except OSError:  # a folder this user may write to but not read: nothing to lock it by
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export into {folder} is running: wait for it to end, or export into "
                              "another folder") from None
        except OSError:  # no locks here
            pass
        yield
    finally:
        os.close(descriptor)


def _remove_partial(out: Path, created: Path | None) -> None:
    """Undo a first export into `out` that failed: the folder was new (`created`: the outermost
    folder the export made) or empty (`_earlier_export`)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for path in out.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _earlier_export(out: Path, model: str) -> set[str]:
    """The task files an earlier export of `model` into `out` listed (a re-export replaces it and
    removes those it no longer lists), also one killed while moving its files into place. ExportError
    if `out` holds anything else: another model's export is never overwritten, nor a folder of other
    files."""
    for index in (out / INDEX, out / COMMITTING):
        if index.is_file():
            try:
                earlier = json.loads(index.read_text())
                owner = earlier["model"]
                files = {task["file"] for task in earlier["tasks"]} | set(earlier.get("replaces", ()))
            except (ValueError, KeyError, TypeError) as error:
                raise ExportError(f"{out} has an unreadable {index.name} ({error}): export into another folder, "
                                  "or remove this one first") from None
            if owner != model:
                raise ExportError(f"{out} holds the ONNX export of model '{owner}': export '{model}' into another "
                                  "folder, or remove that one first")
            return files
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: export into a new or empty folder")
    if out.exists() and any(not path.name.startswith(STAGING) for path in out.iterdir()):
        raise ExportError(f"{out} is not an empty folder and holds no maskbank export: export into a new or "
                          "empty folder")
    return set()


def save_checked(model: onnx.ModelProto, path: Path) -> None:
    """Check `model` with onnx.checker (full check, with shape inference), then write it."""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
