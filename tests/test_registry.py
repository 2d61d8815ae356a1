"""The registry on real files: verified blobs, checksummed manifests, compare-and-swap publishing."""

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from registry import (
    BlobCorrupt,
    BlobNotFound,
    InvalidName,
    ManifestError,
    ModelNotFound,
    PackedMasks,
    PublishConflict,
    Registry,
    TaskNotFound,
    build_architecture,
)
from registry.errors import InvalidArtifact, RegistryUnreachable, UnknownName
from registry.storage import LocalStorage

from .conftest import manifest_with, signed_manifest


def test_blob_round_trip_and_content_address(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.put("tensors/v1", {"x": torch.arange(5.0)})
    assert ref.digest.startswith("sha256:") and ref.size == Path(registry.blobs.describe(ref.digest)).stat().st_size
    assert registry.put("tensors/v1", {"x": torch.arange(5.0)}) == ref  # idempotent
    assert torch.equal(registry.load(ref)["x"], torch.arange(5.0))


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    registry = Registry(tmp_path)
    ref = registry.put("tensors/v1", {"x": torch.arange(5.0)})
    path = Path(registry.blobs.describe(ref.digest))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BlobCorrupt) as info:
        registry.load(ref)
    assert ref.digest in str(info.value) and str(path) in str(info.value)


def test_a_missing_blob_is_reported(tmp_path):
    registry = Registry(tmp_path)
    with pytest.raises(BlobNotFound, match="sha256:" + "0" * 64):
        registry.blobs.get("sha256:" + "0" * 64)
    with pytest.raises(BlobCorrupt, match="malformed blob reference"):
        registry.blobs.get("sha256:../../etc/passwd")


def test_manifest_round_trip(tmp_path):
    registry = Registry(tmp_path)
    manifest = registry.commit(manifest_with(registry, tasks=2))
    assert registry.manifest("m") == manifest
    assert registry.generations("m") == [1] and registry.list_models() == ["m"]
    assert registry.manifest("m").task("t1").id == 1 and registry.manifest("m").task(0).name == "t0"


def test_generations_are_compare_and_swap(tmp_path):
    registry = Registry(tmp_path)
    first = registry.commit(manifest_with(registry))
    second = first.next(tasks=manifest_with(registry, tasks=2).tasks)
    registry.commit(second)
    with pytest.raises(PublishConflict, match="registry is at generation 2; another publisher got there first"):
        registry.commit(second)  # a second publisher of generation 2 loses
    with pytest.raises(PublishConflict):
        registry.commit(second.next().next())  # skipping a generation is refused too
    assert registry.generations("m") == [1, 2]
    assert registry.manifest("m", 1) == first and registry.manifest("m") == second


def test_published_tasks_can_only_be_appended(tmp_path):
    registry = Registry(tmp_path)
    manifest = manifest_with(registry, tasks=2)
    with pytest.raises(ManifestError, match="immutable"):
        manifest.next(tasks=manifest.tasks[:1])


def _with_task_field(body: dict, key: str, value) -> dict:
    return {**body, "tasks": [{**body["tasks"][0], key: value}, *body["tasks"][1:]]}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "unreadable"),
        (lambda text: text.replace('"num_classes": 2', '"num_classes": 3', 1), "fails its checksum"),
        # with a valid checksum: a traceback (AttributeError, RecursionError) in every command before
        (lambda text: signed_manifest([1, 2]), "is malformed: its body is a JSON list, not an object"),
        (lambda text: signed_manifest({**json.loads(text)["manifest"], "backbones": []}),
         "is malformed: TypeError: backbones is \\[\\], of the wrong type"),
        (lambda text: signed_manifest({**json.loads(text)["manifest"], "input_shape": "64"}), "input_shape is \"64\""),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "num_classes", "ten")),
         "task 0 num_classes is \"ten\", of the wrong type"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "num_classes", 0)),
         "task 0 num_classes is 0, not a positive count"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "parts", {
            "masks": {"digest": "../../../../etc/passwd", "codec": "raw", "size": 1}})),
         "digest '../../../../etc/passwd' is not 'sha256:' and 64 hex digits"),
        (lambda text: signed_manifest({**json.loads(text)["manifest"], "backbones": {
            "x": next(iter(json.loads(text)["manifest"]["backbones"].values()))}}), "backbone version 'x' is not a number"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "parts", {})),
         r"malformed: model 'm': task 0 \(t0\): method supsup needs part 'masks'; the task has parts \[\]$"),
        (lambda text: signed_manifest({**json.loads(text)["manifest"], "tasks": [
            {**json.loads(text)["manifest"]["tasks"][0], "method": "impresslearn", "parts": {}}]}),
         "method impresslearn needs part 'alpha' and the model's shared part 'basis_masks'; the task has parts"),
        (lambda text: "[" * 100_000 + "]" * 100_000, "is unreadable .RecursionError"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "labels", ["a"])),
         r"task 0 \(t0\): 2 classes but 1 labels: \['a'\]"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "labels", [0, 1])),
         "task 0 labels is 0, of the wrong type"),
        (lambda text: signed_manifest(_with_task_field(json.loads(text)["manifest"], "labels", ["a\nb", "c"])),
         r"task 0 \(t0\): class label 'a\\nb' has a line break"),
    ],
)
def test_damaged_manifests_are_refused(tmp_path, damage, message):
    registry = Registry(tmp_path)
    registry.commit(manifest_with(registry))
    path = tmp_path / "models" / "m" / "generations" / "0000000001.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ManifestError, match=message) as info:
        registry.manifest("m")
    assert str(path) in str(info.value)


def test_labels_round_trip_and_a_manifest_written_without_them_reads_as_none(tmp_path):
    registry = Registry(tmp_path)
    manifest = manifest_with(registry)
    labelled = dataclasses.replace(manifest.tasks[0], labels=["cat", "dog"])
    registry.commit(dataclasses.replace(manifest, tasks=(labelled,)))
    assert registry.manifest("m").tasks[0].labels == ("cat", "dog")
    path = tmp_path / "models" / "m" / "generations" / "0000000001.json"
    body = json.loads(path.read_text())["manifest"]
    del body["tasks"][0]["labels"]  # as maskbank wrote manifests before tasks had labels
    path.write_text(signed_manifest(body))
    assert registry.manifest("m").tasks[0].labels == ()


def test_unknown_format_version_is_refused(tmp_path):
    registry = Registry(tmp_path)
    manifest = manifest_with(registry)
    object.__setattr__(manifest, "format_version", 99)
    registry.commit(manifest)
    with pytest.raises(ManifestError, match="format version 99; this maskbank reads version 1: upgrade"):
        registry.manifest("m")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "a" * 200, "x..y"])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidName, match="invalid model name"):
        Registry(tmp_path).manifest(name)


def test_unknown_model_and_task_messages(tmp_path):
    registry = Registry(tmp_path)
    registry.commit(manifest_with(registry))
    with pytest.raises(ModelNotFound, match=r"has no model 'nope' \(models: m\)"):
        registry.manifest("nope")
    with pytest.raises(ModelNotFound, match=r"has no generation 9 of model 'm' \(its generations: 1 to 1\)$"):
        registry.manifest("m", 9)  # it listed the registry's models
    with pytest.raises(ModelNotFound, match=r"has no generation 9 of model 'nope' \(models: m\)$"):
        registry.manifest("nope", 9)
    with pytest.raises(TaskNotFound, match=r"no task 7 at generation 1 \(tasks: 0 \(t0\)\)"):
        registry.manifest("m").task(7)


def test_architecture_specs():
    module = build_architecture({"arch": "mlp", "sizes": [64, 32, 10]})
    assert [n for n, _ in module.named_parameters()] == ["fc0.weight", "fc1.weight"]
    assert module(torch.zeros(3, 64)).shape == (3, 10)
    with pytest.raises(UnknownName, match=r"Unknown architecture 'vit' \(known: .*mlp"):
        build_architecture({"arch": "vit"})
    with pytest.raises(Exception, match="takes"):
        build_architecture({"arch": "mlp", "sizes": [4, 2], "depth": 3})


def test_manifest_file_is_readable_json(tmp_path):
    registry = Registry(tmp_path)
    registry.commit(manifest_with(registry))
    doc = json.loads((tmp_path / "models" / "m" / "generations" / "0000000001.json").read_text())
    assert doc["manifest"]["format_version"] == 1 and len(doc["sha256"]) == 64


def test_blobs_and_manifests_are_readable_as_the_umask_allows(tmp_path):
    """They were 0600 (mkstemp's mode): a server or verifier running as another user could not read
    a registry the trainer wrote."""
    registry = Registry(tmp_path)
    before = os.umask(0o002)  # the umask when the file is written, not when maskbank was imported
    try:
        registry.commit(manifest_with(registry))
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(files) >= 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664}
        os.umask(0o077)  # a second writer with a stricter umask reuses a blob: it stays readable to the others
        own = registry.put("tensors/v1", {"w": torch.zeros(3)})
        reused = registry.put_backbone({"w": torch.ones(2, 2)}).blob  # model m's backbone, written again
        assert stat.S_IMODE(Path(registry.blobs.describe(own.digest)).stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(registry.blobs.describe(reused.digest)).stat().st_mode) == 0o664
    finally:
        os.umask(before)


def test_supsup_materialiser_computes_weight_times_mask_bit_for_bit_and_leaves_the_mask_alone():
    from registry import effective_parameters

    generator = torch.Generator().manual_seed(0)
    backbone = {"w": torch.randn(5, 7, generator=generator)}  # negative weights: -0.0 where masked
    masks = (torch.rand(5, 7, generator=generator) < 0.5,
             (torch.rand(7, 5, generator=generator) < 0.5).t())  # a non-contiguous bool view
    for mask in masks:
        kept = mask.clone()
        for given in ({"w": mask}, PackedMasks.pack({"w": mask})):  # as trained, as a registry loads them
            served = effective_parameters("supsup", backbone, {"masks": given})["w"]
            expected = backbone["w"] * mask
            assert torch.equal(served.view(torch.int32), expected.view(torch.int32)) and torch.equal(mask, kept)
    with pytest.raises(InvalidArtifact, match="mask 'w' must be boolean, got torch.float32"):
        effective_parameters("supsup", backbone, {"masks": {"w": masks[0].float()}})


def test_supsup_writes_into_given_buffers_the_same_bits_it_would_allocate():
    from registry import effective_parameters

    generator = torch.Generator().manual_seed(0)
    backbone = {"w": torch.randn(5, 7, generator=generator)}
    out = {"w": torch.full((5, 7), float("nan"))}
    for mask in (torch.rand(5, 7, generator=generator) < 0.5, torch.rand(5, 7, generator=generator) < 0.5):
        fresh = effective_parameters("supsup", backbone, {"masks": {"w": mask}})["w"]
        written = effective_parameters("supsup", backbone, {"masks": {"w": mask}}, out=out)["w"]
        assert written is out["w"] and torch.equal(written.view(torch.int32), fresh.view(torch.int32))
    with pytest.raises(ValueError, match=r"a buffer for mask 'w' must be a contiguous CPU torch.float32 tensor of "
                                         r"shape \[5, 7\], got cpu torch.float32 \[7, 5\]"):
        effective_parameters("supsup", backbone, {"masks": {"w": mask}}, out={"w": torch.empty(7, 5)})


def test_supsup_from_masks_in_one_buffer_builds_the_same_bits_as_the_cpus_way():
    """The GPU's way (masks moved into one buffer by PackedMasks.to, unpacked by shift-and-mask, one
    uint8 x float product per weight), run on the CPU: bit for bit the CPU's weights (as_float, then
    an in-place product), fresh or written into buffers, with negative zeros where the mask drops a
    negative weight."""
    from registry import PackedMasks, effective_parameters

    generator = torch.Generator().manual_seed(1)
    backbone = {"a": torch.randn(5, 7, generator=generator), "b": torch.randn(3, 3, 3, generator=generator)}
    masks = PackedMasks.pack({name: torch.rand(w.shape, generator=generator) < 0.5 for name, w in backbone.items()})
    out = {name: torch.full_like(w, float("nan")) for name, w in backbone.items()}
    cpus = effective_parameters("supsup", backbone, {"masks": masks})
    for written in (effective_parameters("supsup", backbone, {"masks": masks.to("cpu")}),
                    effective_parameters("supsup", backbone, {"masks": masks.to("cpu")}, out=out)):
        for name in backbone:
            assert torch.equal(written[name].view(torch.int32), cpus[name].view(torch.int32))
    assert all(written[name] is out[name] for name in backbone)


def test_a_temporary_deleted_before_it_is_moved_in_is_written_again(tmp_path, monkeypatch):
    """`registry gc --grace-seconds 0` during a publish deleted the manifest's temporary file: the
    publish failed with "[Errno 2] No such file or directory: '.../.tmp-...' -> '.../0000000022.json'"."""
    storage, link, deleted = LocalStorage(tmp_path), os.link, []

    def gc_first(source, target, times):
        if len(deleted) < times:
            deleted.append(source)
            os.unlink(source)
        link(source, target)

    monkeypatch.setattr(os, "link", lambda source, target: gc_first(source, target, 2))
    assert storage.create("m/1.json", b"manifest") and (tmp_path / "m" / "1.json").read_bytes() == b"manifest"
    assert len(deleted) == 2 and not list((tmp_path / "m").glob(".tmp-*"))
    deleted.clear()
    monkeypatch.setattr(os, "link", lambda source, target: gc_first(source, target, 3))
    with pytest.raises(FileNotFoundError, match=r"deleted before it could be moved in, 3 times \(a `maskbank "
                                                r"registry gc --grace-seconds 0` running meanwhile\?\)"):
        storage.create("m/2.json", b"manifest")



@pytest.mark.parametrize("answer", ["exists", "unreachable"])
def test_a_publish_whose_answer_was_lost_is_not_taken_for_a_conflict(tmp_path, monkeypatch, answer):
    """On S3 a create-if-absent that succeeded but whose answer was lost is sent again by botocore and
    answered 412 (exists), or times out: the trainer stopped with "another publisher got there first",
    with nobody else publishing and its generation in the registry."""
    registry, rival = Registry(tmp_path), Registry(tmp_path)
    create = registry.storage.create
    first_of_rival = {}

    def answer_lost(key: str, data: bytes) -> bool:
        if first_of_rival:  # a real conflict: the rival's generation lands first
            assert rival.storage.create(key, first_of_rival.pop("data"))
        create(key, data)
        if answer == "exists":
            return False
        raise RegistryUnreachable(f"cannot reach registry {tmp_path}: ReadTimeoutError: read timed out")

    monkeypatch.setattr(registry.storage, "create", answer_lost)
    published = registry.commit(manifest_with(registry))
    assert registry.manifest("m") == published
    first_of_rival["data"] = dataclasses.replace(manifest_with(rival, tasks=2), generation=2).to_json()
    error = PublishConflict if answer == "exists" else RegistryUnreachable
    with pytest.raises(error):
        registry.commit(dataclasses.replace(manifest_with(registry, tasks=3), generation=2))
    assert len(rival.manifest("m").tasks) == 2
