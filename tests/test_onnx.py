"""ONNX export and the ONNX Runtime backend: parity with PyTorch for every method, the exported
files (checker, dynamic batch, both layouts), the Triton repository, the CLI, and a real server.

Tolerance: ONNX Runtime's logits must match PyTorch's within 1e-5 absolute. Both compute in
float32 from the same effective weights, but their kernels sum in different orders (MLAS vs
oneDNN/MKL blocking, and ONNX Runtime folds BatchNorm into the convolution weights when the
weights are constant), so results differ by float32 reassociation error: a few ulps of the
accumulated values, about 1e-6 for logits of magnitude 1-10 here. 1e-5 leaves room for that and
is far below any difference a wrong weight, a missed BatchNorm statistic or a wrong task makes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.numpy
import torch
import tritonclient.grpc as triton
from google.protobuf import text_format

from maskbank.cli import main
from maskbank.process import ServerProcess
from registry import Registry, TaskNotFound
from registry.materialize import _MATERIALIZERS
from registry.errors import ExportError
from registry.onnx_export import architecture_graph, export_onnx, onnx_weights, task_weights, weights_as_inputs
from serving._proto import maskbank_pb2 as mb
from serving._proto import maskbank_pb2_grpc as mb_grpc
from serving._proto import model_config as mc
from serving.cache import LRUCache
from serving.onnx_backend import OnnxRuntimeBackend
from serving.snapshot import Snapshot
from serving.triton_export import export_triton
from trainer import get_method, method_names, train

from .conftest import TINY, train_model, wait_for

TOLERANCE = 1e-5  # absolute, on logits (module docstring)
MLP = {"arch": "mlp", "sizes": [64, 32, 10]}
CNN_BN = {"arch": "cnn", "input_shape": [1, 8, 8], "width": 4, "bn": "nonaffine"}
RESNET_BN = {"arch": "resnet18", "input_shape": [1, 8, 8], "width": 4}
X = np.random.default_rng(0).random((7, 64), dtype=np.float32)


def quick_config(method: str) -> dict:
    """The method's defaults with every epoch count at 1: the weights need not be good, only real."""
    return {f.name: 1 for f in dataclasses.fields(get_method(method).Config) if f.name.endswith("epochs")}


def train_quickly(root, method: str, architecture: dict, tasks: int = 2) -> Registry:
    registry = Registry(root)
    requested = {"method": method, "stream": "permuted-digits", "architecture": architecture,
                 "method_config": quick_config(method)}
    train(registry, "m", tasks, requested, log=lambda _: None)
    return registry


def snapshot_of(registry: Registry) -> Snapshot:
    return Snapshot.load(registry, registry.manifest("m"), None, LRUCache(64 << 20))


def assert_onnxruntime_matches_pytorch(registry: Registry) -> None:
    """Every task: the serving backend's ONNX Runtime logits, and the exported graph with the weights
    fed as inputs, against the PyTorch forward, within TOLERANCE."""
    snapshot = snapshot_of(registry)
    backend = OnnxRuntimeBackend(threads=1)
    graph = architecture_graph(snapshot.manifest.architecture)
    shared = ort.InferenceSession(weights_as_inputs(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(X)
    for task in snapshot.healthy_tasks():
        expected = snapshot.logits(task, x).numpy()
        served = backend.logits(snapshot, task, x).numpy()
        fed = shared.run(None, {"input": X, **onnx_weights(graph, snapshot.parameters(task))})[0]
        assert served.shape == expected.shape == (len(X), task.entry.num_classes)
        np.testing.assert_allclose(served, expected, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(fed[:, : task.entry.num_classes], expected, rtol=0, atol=TOLERANCE)


def test_the_parity_sweep_covers_every_served_method():
    """Every method a server can materialise is one the trainer can make a test model of."""
    assert set(_MATERIALIZERS) <= set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_onnxruntime_matches_pytorch_for_every_method(tmp_path, method):
    assert_onnxruntime_matches_pytorch(train_quickly(tmp_path, method, MLP))


@pytest.mark.parametrize("architecture", [CNN_BN, pytest.param(RESNET_BN, marks=pytest.mark.slow)],
                         ids=["cnn-bn", "resnet18-bn"])
def test_onnxruntime_matches_pytorch_with_per_task_batchnorm_statistics(tmp_path, architecture):
    registry = train_quickly(tmp_path, "supsup", architecture)
    tasks = snapshot_of(registry).healthy_tasks()
    assert tasks[0].parts["bn_stats"]  # per-task statistics: a shared graph with folded BN would fail below
    assert_onnxruntime_matches_pytorch(registry)


@pytest.fixture(scope="module")
def bn_registry(tmp_path_factory) -> Registry:
    return train_quickly(tmp_path_factory.mktemp("bn"), "supsup", CNN_BN)


def pytorch_logits(registry: Registry, x: np.ndarray) -> dict[int, np.ndarray]:
    snapshot = snapshot_of(registry)
    return {t.entry.id: snapshot.logits(t, torch.from_numpy(x)).numpy() for t in snapshot.healthy_tasks()}


def test_gradient_modes_refuse_per_task_batchnorm_statistics(bn_registry):
    """Superposed masks have no BatchNorm statistics to run with: the gradient modes failed with
    DATA_LOSS ('missing bn0.running_mean') on a healthy model. They are refused like any mode that does
    not apply, and a server default of oneshot falls back to exhaustive for this model."""
    from serving.errors import InvalidRequest
    from serving.task_inference import default_or_exhaustive, infer_task, usable_modes

    snapshot = snapshot_of(bn_registry)
    assert usable_modes(snapshot) == ["exhaustive"] and default_or_exhaustive(snapshot, "oneshot") == "exhaustive"
    for mode in ("oneshot", "oneshot-input", "binary"):
        with pytest.raises(InvalidRequest, match=f"task_inference '{mode}' needs mask-based tasks on one backbone "
                                                 "version without per-task BatchNorm statistics"):
            infer_task(mode, snapshot, torch.from_numpy(X))
    assert infer_task("exhaustive", snapshot, torch.from_numpy(X)).mode == "exhaustive"


def test_export_onnx_both_layouts_check_run_any_batch_and_agree(bn_registry, tmp_path):
    shared_index = json.loads(export_onnx(bn_registry, "m", tmp_path / "shared").read_text())
    contained_index = json.loads(export_onnx(bn_registry, "m", tmp_path / "contained", layout="self-contained").read_text())
    assert [t["id"] for t in shared_index["tasks"]] == [t["id"] for t in contained_index["tasks"]] == [0, 1]
    backbone = onnx.load(tmp_path / "shared" / "backbone.onnx")
    onnx.checker.check_model(backbone, full_check=True)
    assert [i.name for i in backbone.graph.input] == ["input", *shared_index["weights"]]
    assert not backbone.graph.initializer  # the weights come from outside
    shared = ort.InferenceSession(str(tmp_path / "shared" / "backbone.onnx"), providers=["CPUExecutionProvider"])
    for rows in (1, 7):
        x = X[:rows]
        expected = pytorch_logits(bn_registry, x)
        for task, contained_task in zip(shared_index["tasks"], contained_index["tasks"]):
            weights = safetensors.numpy.load_file(tmp_path / "shared" / task["file"])
            fed = shared.run(None, {"input": x, **weights})[0][:, : task["num_classes"]]
            contained_file = tmp_path / "contained" / contained_task["file"]
            onnx.checker.check_model(onnx.load(contained_file), full_check=True)
            session = ort.InferenceSession(str(contained_file), providers=["CPUExecutionProvider"])
            contained = session.run(None, {"input": x})[0]
            assert fed.shape == contained.shape == (rows, task["num_classes"])
            np.testing.assert_allclose(contained, fed, rtol=0, atol=TOLERANCE)
            np.testing.assert_allclose(contained, expected[task["id"]], rtol=0, atol=TOLERANCE)


def test_export_only_the_tasks_asked_for(bn_registry, tmp_path):
    index = json.loads(export_onnx(bn_registry, "m", tmp_path, ["perm-1"]).read_text())
    assert [t["id"] for t in index["tasks"]] == [1]
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["1.safetensors"]
    with pytest.raises(TaskNotFound, match=r"no task 5 .*tasks: 0 \(perm-0\), 1 \(perm-1\)"):
        list(task_weights(bn_registry, bn_registry.manifest("m"), [5]))


def test_a_task_named_twice_is_exported_once(bn_registry, tmp_path):
    index = json.loads(export_onnx(bn_registry, "m", tmp_path, [1, "perm-1", 0, 1]).read_text())
    assert [t["id"] for t in index["tasks"]] == [1, 0]


def test_a_failed_first_export_leaves_nothing_so_the_same_command_can_retry(bn_registry, tmp_path):
    """A corrupt blob midway left backbone.onnx and the tasks before it, and the retry was refused
    ('not an empty folder'), though the command itself had made that folder."""
    import shutil

    from registry import BlobCorrupt

    copy = Registry(shutil.copytree(bn_registry.location, tmp_path / "reg"))
    blob = Path(copy.blobs.describe(copy.manifest("m").task(1).parts["masks"].digest))
    good = blob.read_bytes()
    blob.write_bytes(b"corrupt")
    (tmp_path / "empty").mkdir()
    for out, left in ((tmp_path / "new", False), (tmp_path / "empty", True), (tmp_path / "a" / "b" / "c", False)):
        with pytest.raises(BlobCorrupt):
            export_onnx(copy, "m", out)
        assert out.exists() == left and (not left or not any(out.iterdir()))
    assert not (tmp_path / "a").exists()  # nor the folders made to hold a nested new one
    blob.write_bytes(good)
    assert [t["id"] for t in json.loads(export_onnx(copy, "m", tmp_path / "new").read_text())["tasks"]] == [0, 1]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="file is a file, not a folder"):
        export_onnx(copy, "m", tmp_path / "file")


def test_a_re_export_replaces_its_own_files_and_never_another_models(bn_registry, tmp_path):
    """Exporting again into the same folder replaces that model's export and removes the task files
    it no longer lists; another model's export, or a folder of other files, is refused untouched."""
    out = tmp_path / "out"
    export_onnx(bn_registry, "m", out)
    export_onnx(bn_registry, "m", out, ["perm-1"], layout="self-contained")
    index = json.loads((out / "export.json").read_text())
    assert [t["file"] for t in index["tasks"]] == ["tasks/1.onnx"] and index["layout"] == "self-contained"
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["1.onnx"]
    assert not (out / "export.json.partial").exists()
    (out / "export.json").write_text(json.dumps({**index, "model": "other"}))  # as another model's export
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match=f"{out} holds the ONNX export of model 'other': export 'm' into another"):
        export_onnx(bn_registry, "m", out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes is not an empty folder and holds no maskbank export"):
        export_onnx(bn_registry, "m", tmp_path / "notes")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_a_failed_re_export_leaves_the_earlier_export_as_it_was(bn_registry, tmp_path):
    """A re-export that failed on a corrupt blob had already rewritten backbone.onnx and the tasks
    before it, under the earlier export.json: an index that described files it no longer matched."""
    import shutil

    from registry import BlobCorrupt

    copy = Registry(shutil.copytree(bn_registry.location, tmp_path / "reg"))
    out = tmp_path / "out"
    export_onnx(copy, "m", out, [0])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    blob = Path(copy.blobs.describe(copy.manifest("m").task(1).parts["masks"].digest))
    blob.write_bytes(b"corrupt")
    with pytest.raises(BlobCorrupt):
        export_onnx(copy, "m", out, [0, 1], layout="self-contained")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert oct((out / "tasks" / "0.safetensors").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def test_an_export_killed_while_moving_its_files_is_taken_up_by_the_next(bn_registry, tmp_path):
    """Killed between its first and last move, an export leaves no export.json (no reader takes the mix)
    but its pending index, by which the same command recognises the folder as this model's export."""
    from registry.onnx_export import COMMITTING, INDEX

    out = tmp_path / "out"
    export_onnx(bn_registry, "m", out, [0], layout="self-contained")
    index = json.loads((out / INDEX).read_text())  # a re-export of task 1 alone, killed mid-commit, leaves:
    (out / COMMITTING).write_text(json.dumps({**index, "tasks": [], "replaces": ["tasks/0.onnx"]}))
    (out / INDEX).unlink()
    (out / ".staging-x").mkdir()  # and a staging folder of a kill while writing
    index = json.loads(export_onnx(bn_registry, "m", out, ["perm-1"]).read_text())
    assert [t["file"] for t in index["tasks"]] == ["tasks/1.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["backbone.onnx", "export.json", "tasks"]
    assert [p.name for p in (out / "tasks").iterdir()] == ["1.safetensors"]  # the file it was replacing: gone


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_triton_repository_configs_parse_and_every_model_loads(bn_registry, tmp_path):
    models = export_triton(bn_registry, "m", tmp_path, max_batch_size=64).models
    assert [m.name for m in models] == ["m.task-0", "m.task-1"]
    expected = pytorch_logits(bn_registry, X)
    for task, directory in enumerate(models):
        config = text_format.Parse((directory / "config.pbtxt").read_text(), mc.ModelConfig())
        assert (config.name, config.platform, config.max_batch_size) == (directory.name, "onnxruntime_onnx", 64)
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", mc.TYPE_FP32, [64])]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("logits", mc.TYPE_FP32, [10])]
        assert config.output[0].label_filename == "labels.txt"  # Triton's classification names the digits too
        assert (directory / "labels.txt").read_text().splitlines() == [str(digit) for digit in range(10)]
        assert config.HasField("dynamic_batching") and config.parameters["task_id"].string_value == str(task)
        versions = [p.name for p in directory.iterdir() if p.is_dir()]
        assert versions == [str(bn_registry.latest_generation("m"))]
        session = ort.InferenceSession(str(directory / versions[0] / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"input": X})[0], expected[task], rtol=0, atol=TOLERANCE)


def test_a_failed_triton_export_adds_nothing_to_the_repository(bn_registry, tmp_path):
    """A corrupt blob midway left the tasks before it as complete Triton models, which Triton would
    serve as if the export had worked; a file given as the repository was a raw OS error."""
    import shutil

    from registry import BlobCorrupt

    copy = Registry(shutil.copytree(bn_registry.location, tmp_path / "reg"))
    repo = tmp_path / "repo"
    (repo / "other-model" / "1").mkdir(parents=True)  # a repository holds other models too: left alone
    blob = Path(copy.blobs.describe(copy.manifest("m").task(1).parts["masks"].digest))
    blob.write_bytes(b"corrupt")
    with pytest.raises(BlobCorrupt, match=r"task 1 \(perm-1\) of model 'm' cannot be exported: blob sha256:\w+ at .* "
                                          r"is corrupt.*\(the other tasks export when named with --task\)"):
        export_triton(copy, "m", repo)
    assert [p.name for p in repo.iterdir()] == ["other-model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg", "repo"]  # no staging folder left
    with pytest.raises(BlobCorrupt):
        export_triton(copy, "m", tmp_path / "new" / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg", "repo"]  # nor the new repository's folders
    export_triton(copy, "m", repo, [0])  # an earlier export of task 0: a failed one leaves it as it was
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    with pytest.raises(BlobCorrupt):
        export_triton(copy, "m", repo)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == ["m.task-0", "other-model"]
    (repo / "m.task-0" / ".staging-killed" / "2").mkdir(parents=True)  # as an export killed midway leaves it
    export_triton(copy, "m", repo, [0])
    assert sorted(p.name for p in (repo / "m.task-0").iterdir()) == ["2", "config.pbtxt", "labels.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="afile is a file, not a folder"):
        export_triton(copy, "m", tmp_path / "afile")
    blob.unlink()  # every task readable: a file where the last task's model goes stopped the moves midway
    for where in (repo / "m.task-1", repo / "m.task-0" / "2"):  # a new model's place, a new version's
        shutil.rmtree(where, ignore_errors=True)
        where.write_text("not a model")
        before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        with pytest.raises(ExportError, match=f"{re.escape(str(where))} is a file, where this export writes Triton model"):
            export_triton(copy, "m", repo)
        assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
        where.unlink()
        where.symlink_to(tmp_path / "nowhere")  # a link to nothing: exists() is False, and moving in failed midway
        before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        with pytest.raises(ExportError, match=f"{re.escape(str(where))} is a link to nothing, where this export writes"):
            export_triton(copy, "m", repo)
        assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
        where.unlink()
    for inside in (Path(copy.location), Path(copy.location) / "exports"):  # Triton would load blobs/ and models/
        with pytest.raises(ExportError, match="is inside registry .*: export into a folder outside it"):
            export_triton(copy, "m", inside)
        with pytest.raises(ExportError, match="is inside registry"):
            export_onnx(copy, "m", inside)
    assert not (Path(copy.location) / "exports").exists()
    with pytest.raises(ExportError, match="is inside registry"):  # a file:// URL is the same local folder
        export_triton(Registry(f"file://{copy.location}"), "m", Path(copy.location) / "exports")


def test_a_triton_export_takes_no_other_models_folder_and_removes_what_the_registry_withdrew(bn_registry, tmp_path,
                                                                                             capsys):
    """Another Triton model under an exported model's name had its config overwritten beside its own files;
    a folder of `export onnx` became a Triton repository with a tasks/ 'model'; after the registry went back
    a generation, a re-export 'succeeded' and Triton went on serving the withdrawn generation and task."""
    import shutil

    copy = Registry(shutil.copytree(bn_registry.location, tmp_path / "reg"))
    repo = tmp_path / "repo"
    foreign = repo / "m.task-0"
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('platform: "pytorch_libtorch"')
    (foreign / "1" / "model.pt").write_text("theirs")
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match=r"m.task-0 holds a Triton model of platform 'pytorch_libtorch', not an "
                                          r"export of maskbank model 'm': move it away"):
        export_triton(copy, "m", repo)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    (foreign / "config.pbtxt").write_text("not { a config")
    with pytest.raises(ExportError, match="holds a config.pbtxt this export cannot read"):
        export_triton(copy, "m", repo)
    shutil.rmtree(foreign)
    export_onnx(copy, "m", tmp_path / "onnx", [0])
    with pytest.raises(ExportError, match=r"holds an `export onnx` export \(export.json\)"):
        export_triton(copy, "m", tmp_path / "onnx")
    assert main(["export", "triton", "m", "--registry", str(copy.location), "--out", str(repo)]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["m.task-0", "m.task-1"]
    copy.storage.delete(copy.manifest_key("m", 2))  # the registry goes back to generation 1: task 0 alone
    capsys.readouterr()
    assert main(["export", "triton", "m", "--registry", str(copy.location), "--out", str(repo)]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["m.task-0"]
    assert sorted(p.name for p in (repo / "m.task-0").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert f"removed what the registry no longer has (versions above the generation exported, models of tasks it " \
           f"does not list): {repo / 'm.task-0' / '2'}, {repo / 'm.task-1'}" in capsys.readouterr().err
    config = repo / "m.task-0" / "config.pbtxt"  # Triton's own fields this export's subset lacks: still its model
    config.write_text(config.read_text() + "response_cache { enable: true }\n")
    assert main(["export", "triton", "m", "--registry", str(copy.location), "--out", str(repo)]) == 0
    with pytest.raises(ExportError, match=r"max_batch_size must be from 1 .* to 2,147,483,647 \(Triton's field is an "
                                          r"int32\), got 2,147,483,648"):
        export_triton(copy, "m", repo, max_batch_size=2**31)  # a ValueError traceback


def test_a_partial_triton_export_after_a_rollback_leaves_the_other_tasks_models_whole(bn_registry, tmp_path):
    """`export triton --task 0` after a rollback removed the withdrawn version of every task's model: task 1's
    was left without a version, which Triton fails to load (and by default will not start)."""
    import shutil

    copy = Registry(shutil.copytree(bn_registry.location, tmp_path / "reg"))
    copy.commit(copy.manifest("m").next())  # generation 3: the same two tasks
    repo = tmp_path / "repo"
    export_triton(copy, "m", repo)
    copy.storage.delete(copy.manifest_key("m", 3))  # back to generation 2
    export = export_triton(copy, "m", repo, [0])
    assert export.withdrawn == [repo / "m.task-0" / "3"]
    assert sorted(p.name for p in (repo / "m.task-0").iterdir() if p.is_dir()) == ["2"]
    assert sorted(p.name for p in (repo / "m.task-1").iterdir() if p.is_dir()) == ["3"]  # not exported: left alone


def test_cli_exports_and_names_what_exists(bn_registry, tmp_path, capsys):
    root = str(bn_registry.location)
    assert main(["export", "onnx", "m", "--registry", root, "--out", str(tmp_path / "o"), "--task", "0"]) == 0
    assert (tmp_path / "o" / "tasks" / "0.safetensors").exists()
    assert main(["export", "triton", "m", "--registry", root, "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "m.task-1" / "config.pbtxt").exists()
    assert main(["export", "onnx", "nope", "--registry", root, "--out", str(tmp_path / "x")]) == 2
    assert "has no model 'nope' (models: m)" in capsys.readouterr().err
    assert main(["export", "triton", "m", "--registry", root, "--out", str(tmp_path / "x"), "--task", "9"]) == 2
    assert "no task 9 at generation 2 (tasks: 0 (perm-0), 1 (perm-1))" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "triton", "m", "--registry", root, "--out", str(tmp_path / "y"), "--max-batch-size", "0"])
    assert "argument --max-batch-size: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ExportError, match="max_batch_size must be from 1"):
        export_triton(bn_registry, "m", tmp_path / "y", max_batch_size=-3)
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------- a real server with --backend onnxruntime


def infer(client, x: np.ndarray, **parameters):
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("m", [inp], parameters=parameters)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A PyTorch and an ONNX Runtime server over the same registry (5 tiny SupSup tasks)."""
    root = tmp_path_factory.mktemp("served")
    train_model(root, "m", 5, TINY)
    with ServerProcess(root) as torch_server, \
            ServerProcess(root, "--backend", "onnxruntime", "--max-queue-delay-us", "50000") as ort_server:
        clients = {name: triton.InferenceServerClient(server.url)
                   for name, server in (("pytorch", torch_server), ("onnxruntime", ort_server))}
        for client in clients.values():
            wait_for(lambda c=client: c.is_model_ready("m"), what="the model to be ready")
        yield clients, ort_server
        for client in clients.values():
            client.close()


@pytest.mark.slow
def test_served_onnxruntime_logits_match_the_pytorch_server(servers):
    clients, _ = servers
    for task in range(5):
        answers = {name: infer(client, X, task_id=task) for name, client in clients.items()}
        for name, answer in answers.items():
            assert answer.get_response().parameters["backend"].string_param == name
        np.testing.assert_allclose(answers["onnxruntime"].as_numpy("logits"), answers["pytorch"].as_numpy("logits"),
                                   rtol=0, atol=TOLERANCE)
    assert clients["onnxruntime"].get_model_metadata("m").platform == "maskbank_onnxruntime"


@pytest.mark.slow
def test_the_provider_is_logged_once_and_onnxruntime_stays_quiet(servers):
    _, server = servers
    output = list(server.output)
    assert len([line for line in output if "ONNX Runtime" in line and "backend on" in line]) == 1
    assert not [line for line in output if ":onnxruntime:" in line]  # ONNX Runtime's own warnings and errors


@pytest.mark.slow
def test_served_task_inference_exhaustive_on_onnxruntime_gradients_on_pytorch(servers):
    clients, _ = servers
    client = clients["onnxruntime"]
    exhaustive = infer(client, X, task_inference="exhaustive").get_response().parameters
    assert (exhaustive["task_inference"].string_param, exhaustive["backend"].string_param) == ("exhaustive", "onnxruntime")
    reference = infer(clients["pytorch"], X, task_inference="exhaustive").get_response().parameters
    assert exhaustive["task_id"].int64_param == reference["task_id"].int64_param
    oneshot = infer(client, X, task_inference="oneshot").get_response().parameters
    assert (oneshot["task_inference"].string_param, oneshot["backend"].string_param) == ("oneshot", "pytorch")


@pytest.mark.slow
def test_the_dynamic_batcher_merges_requests_on_onnxruntime(servers):
    clients, server = servers
    expected = infer(clients["pytorch"], X, task_id=3).as_numpy("logits")
    before = clients["onnxruntime"].get_inference_statistics("m").model_stats[0]
    answers: list = []

    def ask():
        with triton.InferenceServerClient(server.url) as own:
            answers.append(infer(own, X, task_id=3).as_numpy("logits"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = clients["onnxruntime"].get_inference_statistics("m").model_stats[0]
    assert len(answers) == 8
    for logits in answers:
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE)
    requests = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert requests == 8 * len(X) and executions < 8  # merged: fewer executions than requests


@pytest.mark.slow
def test_maskbank_infer_task_names_the_backend(servers):
    _, server = servers
    request = mb.InferTaskRequest()
    request.request.model_name = "m"
    request.request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.request.raw_input_contents.append(X.tobytes())
    request.request.parameters["task_id"].int64_param = 1
    with grpc.insecure_channel(server.url) as channel:
        answer = mb_grpc.MaskbankStub(channel).InferTask(request)
    assert (answer.task_id, answer.backend) == (1, "onnxruntime")


def test_a_second_export_into_a_folder_while_one_runs_fails_at_once_and_touches_nothing(bn_registry, tmp_path):
    """Two exports into one folder swept away each other's staged files and mixed their own."""
    from registry.onnx_export import export_lock

    out, repo = tmp_path / "out", tmp_path / "repo"
    export_onnx(bn_registry, "m", out, [0])
    repo.mkdir()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with export_lock(out), export_lock(repo):  # as an export running in another process holds them
        (out / ".staging-running").mkdir()  # that export's files, being written
        with pytest.raises(ExportError, match=f"another export into {out} is running: wait for it to end"):
            export_onnx(bn_registry, "m", out)
        with pytest.raises(ExportError, match=f"another export into {repo} is running"):
            export_triton(bn_registry, "m", repo)
        assert (out / ".staging-running").is_dir() and not any(repo.iterdir())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [t["id"] for t in json.loads(export_onnx(bn_registry, "m", out).read_text())["tasks"]] == [0, 1]
    assert len(export_triton(bn_registry, "m", repo).models) == 2


def test_freed_memory_is_given_back_once_per_interval_and_after_a_burst(monkeypatch):
    """malloc_trim after every session build made each build twice as long (the next one faults the
    pages back in); once per interval, a burst's last builds were left untrimmed until another build."""
    from serving import onnx_backend

    monkeypatch.setattr(onnx_backend, "TRIM_INTERVAL_SECONDS", 0.2)
    freed = onnx_backend._FreedMemory()
    trims: list[float] = []
    freed._trim = lambda pad: trims.append(time.monotonic())
    began = time.monotonic()
    for _ in range(5):  # a burst of builds: one trim now, one timer for the rest
        freed.give_back()
    assert len(trims) == 1
    time.sleep(0.5)
    assert len(trims) == 2 and trims[1] - trims[0] >= 0.19 and trims[0] - began < 0.1
