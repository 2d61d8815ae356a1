"""Serving on a GPU (`--device cuda`): every method's tasks give the CPU's logits and the same task
choices, in process and through a real server, and the device is checked at start-up.

The GPU tests run where PyTorch sees a CUDA GPU and are skipped elsewhere (CI has none); the
start-up checks run everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from registry import Registry
from serving import ServerConfig
from serving.cache import LRUCache
from serving.repository import ModelRepository
from serving.snapshot import Snapshot
from serving.task_inference import infer_task, usable_modes
from trainer import get_stream, method_names, train

from .conftest import cli, scrape, train_model, wait_for

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU visible to PyTorch")
ARCH = {"arch": "mlp", "sizes": [64, 32, 32, 10]}
CNN = {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "width": 4}
TASKS, BATCH = 3, 16
FAST = {"impresslearn": {"basis_size": 2, "mask_epochs": 1, "alpha_epochs": 1},
        "cl-lsg": {"epochs": 1, "grow_epochs": 1, "scratch_epochs": 1}}  # the others take `epochs`
CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # float32 products summed in another order; TF32 stays off


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_at_start_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"--device 'cuda': PyTorch .* sees no CUDA GPU .* --device cpu"):
        ServerConfig(registry=str(tmp_path), device="cuda")
    done = cli("serve", "--registry", str(tmp_path), "--device", "cuda", "--port", "0")
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr


@pytest.mark.parametrize("name, message", [("mps", "serves on cpu or cuda, not mps"),
                                           ("gpu0", "not a device name PyTorch knows"),
                                           ("cuda:99", "numbered from 0" if CUDA else "sees no CUDA GPU")])
def test_a_device_this_machine_cannot_serve_on_is_refused(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(registry=str(tmp_path), device=name)


def test_serve_help_explains_the_device():
    text = " ".join(cli("serve", "--help").stdout.split())
    assert "--device" in text and "cuda:N" in text and "bounds GPU memory" in text


@pytest.fixture(scope="module", params=sorted(method_names()) + ["supsup-cnn"])
def trained(request, tmp_path_factory) -> tuple[str, Registry]:
    """TASKS small tasks of each method (and SupSup on a CNN: gradients by autograd), published."""
    if not CUDA:
        pytest.skip("needs a CUDA GPU visible to PyTorch")
    method, architecture = ("supsup", CNN) if request.param == "supsup-cnn" else (request.param, ARCH)
    registry = Registry(tmp_path_factory.mktemp(request.param))
    train(registry, "m", TASKS, {"method": method, "stream": "split-digits", "architecture": architecture,
                                 "method_config": FAST.get(method, {"epochs": 1})}, log=lambda _: None)
    return request.param, registry


def _batches() -> list[torch.Tensor]:
    stream = get_stream("split-digits")
    return [stream.task(t).x_test[:BATCH] for t in range(TASKS)]


@needs_gpu
def test_every_method_serves_the_cpu_logits_and_choices_on_the_gpu(trained):
    """Materialised on the CPU and copied, or kept there as the backbone: the GPU's logits match the
    CPU's, every usable task-inference mode picks the same task, and cached weights live on the GPU."""
    _, registry = trained
    manifest = registry.manifest("m")
    cpu = Snapshot.load(registry, manifest, None, LRUCache(1 << 28))
    gpu = Snapshot.load(registry, manifest, None, LRUCache(1 << 28), device="cuda")
    for x in _batches():
        for task in gpu.healthy_tasks():
            logits = gpu.logits(task, x)
            assert logits.device.type == "cuda"
            torch.testing.assert_close(logits.cpu(), cpu.logits(task, x), **CLOSE)
        many = gpu.logits_of(gpu.healthy_tasks(), x)
        for task_id, logits in cpu.logits_of(cpu.healthy_tasks(), x).items():
            torch.testing.assert_close(many[task_id].cpu(), logits, **CLOSE)
        for mode in usable_modes(cpu):
            assert infer_task(mode, gpu, x).task.entry.id == infer_task(mode, cpu, x).task.entry.id, mode
    weights = [t for value, _ in gpu._cache._entries.values() if isinstance(value, dict) for t in value.values()]
    assert weights and all(t.device.type == "cuda" for t in weights)  # (a mask stack's matrix stays on the CPU)


@needs_gpu
def test_a_new_generation_on_the_gpu_reuses_what_it_uploaded_and_serves_old_tasks_bit_exactly(tmp_path):
    registry = train_model(tmp_path, "m", 2, {"architecture": ARCH, "method_config": {"epochs": 1}})
    repository = ModelRepository(registry, cache_bytes=1 << 26, device="cuda")
    first = repository.load("m")
    x = _batches()[0]
    before = first.logits(first.task(0), x).cpu()
    train(registry, "m", 3, {}, log=lambda _: None)
    repository.refresh()
    second = repository.get("m")
    assert second.generation == first.generation + 1
    assert second._resident["1"] is first._resident["1"]  # the backbone was not copied to the GPU again
    old = first.task(0).key
    assert second._uploaded_parts[old] is first._uploaded_parts[old]  # nor were the old tasks' packed masks
    assert second._uploaded_parts[old]["masks"].device.type == "cuda"
    assert torch.equal(second.logits(second.task(0), x).cpu(), before)


@needs_gpu
def test_a_server_on_the_gpu_answers_tritonclient_like_one_on_the_cpu(tmp_path):
    import tritonclient.grpc as triton

    from maskbank.process import ServerProcess

    registry = train_model(tmp_path, "m", TASKS, {"architecture": ARCH, "method_config": {"epochs": 1}},
                           stream="split-digits")
    x = np.concatenate([b.numpy() for b in _batches()])

    def answers(client, parameters: dict) -> tuple[np.ndarray, str]:
        inp = triton.InferInput("input", list(x[:BATCH].shape), "FP32")
        inp.set_data_from_numpy(x[:BATCH])
        result = client.infer("m", [inp], parameters=parameters)
        return result.as_numpy("logits"), str(result.get_response().parameters["task_id"].int64_param)

    with ServerProcess(registry.location, "--device", "cuda") as gpu, ServerProcess(registry.location) as cpu:
        clients = [triton.InferenceServerClient(s.url) for s in (gpu, cpu)]
        try:
            for client in clients:
                wait_for(lambda c=client: c.is_model_ready("m"), what="the model to be ready")
            for parameters in ({"task_id": 1}, {"task_inference": "oneshot"}, {"task_inference": "exhaustive"}):
                (on_gpu, task_gpu), (on_cpu, task_cpu) = (answers(c, parameters) for c in clients)
                np.testing.assert_allclose(on_gpu, on_cpu, **CLOSE)
                assert task_gpu == task_cpu
            memory = {name: value for (name, labels), value in scrape(gpu).items()
                      if name.startswith("maskbank_gpu_memory_") and labels == (("device", "cuda:0"),)}
            assert memory["maskbank_gpu_memory_total_bytes"] >= memory["maskbank_gpu_memory_used_bytes"] > 0
            assert 0 < memory["maskbank_gpu_memory_allocated_bytes"] <= memory["maskbank_gpu_memory_reserved_bytes"]
            assert not [name for name, _ in scrape(cpu) if name.startswith("maskbank_gpu_")]
        finally:
            for client in clients:
                client.close()


@needs_gpu
def test_supsup_weights_are_built_on_the_gpu_bit_for_bit_as_on_the_cpu(tmp_path):
    """SupSup copies the packed bits over and builds W * M there (materialisation on_any_device): the
    same floats as the CPU's, whether cached or, when the cache admits nothing, in this thread's
    GPU buffers."""
    registry = train_model(tmp_path, "m", 2, {"architecture": ARCH, "method_config": {"epochs": 1}})
    manifest = registry.manifest("m")
    cpu = Snapshot.load(registry, manifest, None, LRUCache(1 << 28))
    cached = Snapshot.load(registry, manifest, None, LRUCache(1 << 28), device="cuda")
    uncached = Snapshot.load(registry, manifest, None, LRUCache(0), device="cuda")
    buffers = set()
    for task in cpu.healthy_tasks():
        expected = cpu.parameters(task)
        for params in (cached.parameters(task), uncached._forward_parameters(task)):
            assert params.keys() == expected.keys()
            for name, tensor in params.items():
                assert tensor.device.type == "cuda" and torch.equal(tensor.cpu(), expected[name])
        buffers.add(tuple(t.data_ptr() for t in uncached._forward_parameters(task).values()))
    assert len(buffers) == 1  # every miss reused the same GPU buffers


@pytest.mark.parametrize("error, where", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                           "GPU memory"),
                                          (MemoryError("Unable to allocate 8.00 GiB for an array"), "memory")])
def test_running_out_of_memory_is_resource_exhausted_with_what_to_do(error, where):
    """Not a bug (INTERNAL) but a request that did not fit now: the client learns to retry or send less."""
    import grpc

    from serving.status import abort_details

    code, message = abort_details("/inference.GRPCInferenceService/ModelInfer", error)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"ran out of {where}" in message and "--cache-bytes or --max-batch-size" in message
