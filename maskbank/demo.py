"""The main job: train SupSup on permuted digits, publish, serve, query with tritonclient, compare."""

from __future__ import annotations

import time

import numpy as np

from registry import MaskbankError, Registry
from trainer import get_stream, train
from trainer.metrics import format_matrix
from trainer.record import training_record

from .process import ServerProcess


def query_accuracy(client, model: str, x: np.ndarray, y: np.ndarray, task_id: int, batch_size: int, parameters: dict):
    """Over the wire: (class accuracy, share of batches whose reported task is `task_id`)."""
    from tritonclient.grpc import InferInput, InferRequestedOutput

    correct, right_task, batches = 0, 0, 0
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        inp = InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        result = client.infer(model, [inp], outputs=[InferRequestedOutput("logits"), InferRequestedOutput("task_id")],
                              parameters=parameters)
        correct += int((result.as_numpy("logits").argmax(axis=1) == y[start : start + batch_size]).sum())
        right_task += int(result.as_numpy("task_id")[0] == task_id)
        batches += 1
    return correct / len(x), right_task / batches


DEMO_SETTINGS = {"method": "supsup", "stream": "permuted-digits"}


def _check_demo_model(registry: Registry, model: str) -> None:
    """MaskbankError unless `model` is new or a demo model, which the demo reuses and appends to: train's
    own refusal of other settings tells the user to omit options the demo does not have."""
    manifest = registry.find_manifest(model)
    settings = DEMO_SETTINGS if manifest is None else (training_record(manifest) or {"settings": {}})["settings"]
    if any(settings.get(key) != value for key, value in DEMO_SETTINGS.items()):
        raise MaskbankError(f"model '{model}' in {registry.location} is not a demo model ({settings.get('method')} on "
                            f"{settings.get('stream')}; the demo trains supsup on permuted-digits): pick another "
                            "--model or --registry")


def run_demo(registry_dir: str, model: str, tasks: int, batch_size: int, threads: int = 1) -> None:
    import torch
    import tritonclient.grpc as triton

    torch.set_num_threads(threads)
    began = time.perf_counter()
    registry = Registry(registry_dir)
    _check_demo_model(registry, model)
    print(f"== 1. training {tasks} permuted-digits tasks with SupSup into {registry_dir} (model '{model}')")
    manifest = train(registry, model, tasks, DEMO_SETTINGS)
    names = [t.name for t in manifest.tasks]
    print("\ntrainer's accuracy matrix (row: after learning task i; column: test accuracy on task j)")
    print(format_matrix(manifest.training["accuracy_matrix"], names))

    print(f"\n== 2. serving {registry_dir} on loopback")
    with ServerProcess(registry_dir, "--threads", str(threads)) as server:
        client = triton.InferenceServerClient(server.url)
        deadline = time.monotonic() + 60
        while not (client.is_server_ready() and client.is_model_ready(model)):
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 60 s")
            time.sleep(0.2)
        meta = client.get_model_metadata(model)
        print(f"server at {server.url}; model '{meta.name}' version {list(meta.versions)}, "
              f"input {meta.inputs[0].name} {meta.inputs[0].datatype} {list(meta.inputs[0].shape)}")

        print(f"\n== 3. querying every task with tritonclient in batches of {batch_size}")
        settings = manifest.training["settings"]
        stream = get_stream(settings["stream"], settings["seed"], settings.get("data_root"))
        rows = []
        for entry in manifest.tasks:
            task = stream.task(entry.id)
            x, y = task.x_test.numpy(), task.y_test.numpy()
            gg, _ = query_accuracy(client, model, x, y, entry.id, batch_size, {"task_id": entry.id})
            ex_acc, ex_task = query_accuracy(client, model, x, y, entry.id, batch_size, {"task_inference": "exhaustive"})
            os_acc, os_task = query_accuracy(client, model, x, y, entry.id, batch_size, {"task_inference": "oneshot"})
            trained = manifest.training["accuracy_matrix"][-1][entry.id]
            rows.append((entry.id, entry.name, trained, gg, ex_task, ex_acc, os_task, os_acc))
        client.close()
    print()
    print("| task | trainer accuracy | served, task given | GN exhaustive: right task | GN exhaustive: accuracy "
          "| GN oneshot: right task | GN oneshot: accuracy |")
    print("|---|---|---|---|---|---|---|")
    for id_, name, *values in rows:
        print(f"| {id_} ({name}) | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    means = np.mean([r[2:] for r in rows], axis=0)
    print("| mean | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print(f"\nserver stopped cleanly; demo took {time.perf_counter() - began:.0f} s")
