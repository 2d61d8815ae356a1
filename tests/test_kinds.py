"""Every artifact kind round-trips through the registry, is checked against its backbone, and
backbone versions are stored as sparse deltas when that is smaller."""

from __future__ import annotations

import pytest
import torch

from registry import InvalidArtifact, Manifest, ManifestError, Registry, TaskEntry
from registry.kinds import KINDS

g = torch.Generator().manual_seed(0)
BACKBONE = {"fc0.weight": torch.randn(16, 8, generator=g), "fc1.weight": torch.randn(4, 16, generator=g)}
VALID = {
    "masks": {n: torch.rand(w.shape, generator=g) < 0.3 for n, w in BACKBONE.items()},
    "basis_masks": {n: torch.rand(5, *w.shape, generator=g) < 0.5 for n, w in BACKBONE.items()},
    "alpha": {n: torch.rand(5, generator=g) for n in BACKBONE},
    "head": {"weight": torch.randn(3, 16, generator=g), "bias": torch.zeros(3)},
    "bn_stats": {"bn1.running_mean": torch.randn(16, generator=g), "bn1.running_var": torch.rand(16, generator=g)},
    "growth_masks": {"fc0.channels": torch.rand(16, generator=g) < 0.5, "fc0.kernels": torch.rand(16, 8, generator=g) < 0.5},
    "grown_weights": {"conv2.weight": torch.randn(2, 4, 3, 3, generator=g)},
    "filter_mask": {"conv1": torch.tensor([True, False, True, True]), "conv2": torch.ones(8, dtype=torch.bool)},
}
INVALID = {
    "masks": ({"fc0.weight": torch.ones(16, 8, dtype=torch.bool)}, "backbone's masked weights are"),
    "basis_masks": ({n: torch.ones(5, 2, 2, dtype=torch.bool) for n in BACKBONE}, r"expected \[5, 16, 8\]"),
    "alpha": ({n: torch.ones(5, dtype=torch.int64) for n in BACKBONE}, "must be floating point"),
    "head": ({"weight": torch.ones(3, dtype=torch.bool)}, "must be floating point"),
    "bn_stats": ({"bn1.running_mean": torch.zeros(16)}, "need 1-D running_mean and running_var"),
    "growth_masks": ({"fc0.kernels": torch.ones(16, dtype=torch.bool)}, "expected 'LAYER.channels'"),
    "grown_weights": ({"w": torch.ones(2, dtype=torch.int32)}, "must be floating point"),
    "filter_mask": ({"conv1": torch.ones(2, 2, dtype=torch.bool)}, "one 1-D boolean vector"),
}


def test_every_kind_is_covered():
    assert set(VALID) == set(KINDS) == set(INVALID)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_round_trips_through_a_published_manifest(tmp_path, kind):
    registry = Registry(tmp_path)
    backbone = registry.put_backbone(BACKBONE)
    ref = registry.put_part(kind, VALID[kind], BACKBONE)
    assert ref.codec in KINDS[kind].codecs
    shared = {kind: ref} if kind == "basis_masks" else {}
    parts = {} if shared else {kind: ref}
    task = TaskEntry(id=0, name="t0", method="any", backbone="1", num_classes=3, parts=parts)
    registry.commit(Manifest(model="m", generation=1, architecture={"arch": "mlp", "sizes": [8, 16, 4]},
                             input_shape=(8,), backbones={"1": backbone}, tasks=(task,), shared=shared))
    manifest = registry.manifest("m")
    stored = manifest.shared[kind] if shared else manifest.task(0).parts[kind]
    value = registry.load(stored)
    assert value.keys() == VALID[kind].keys()
    for name, tensor in VALID[kind].items():
        assert value[name].dtype == tensor.dtype and torch.equal(value[name], tensor)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_malformed_parts_are_refused_before_they_are_written(tmp_path, kind):
    value, message = INVALID[kind]
    with pytest.raises(InvalidArtifact, match=message):
        Registry(tmp_path).put_part(kind, value, BACKBONE)


def test_backbone_versions_as_sparse_deltas(tmp_path):
    registry = Registry(tmp_path)
    backbone = {"fc0.weight": torch.randn(64, 32, generator=g), "fc1.weight": torch.randn(10, 64, generator=g)}
    v1 = registry.put_backbone(backbone)
    small_change = {n: w.clone() for n, w in backbone.items()}
    small_change["fc0.weight"][3, 4] += 1.0
    v2 = registry.put_backbone(small_change, base=("1", backbone))
    grown = {**small_change, "fc0.weight": torch.randn(80, 32, generator=g)}  # a layer grew channels
    v3 = registry.put_backbone(grown, base=("2", small_change))
    rewritten = {n: torch.randn(w.shape, generator=g) for n, w in grown.items()}  # every weight moved
    v4 = registry.put_backbone(rewritten, base=("3", grown))
    assert (v2.base, v3.base, v4.base) == ("1", "2", None)  # a full copy wins when the delta is larger
    assert v2.blob.size < v1.blob.size / 20  # one changed weight costs an index and a value
    manifest = Manifest(model="m", generation=1, architecture={}, input_shape=(8,),
                        backbones={"1": v1, "2": v2, "3": v3, "4": v4}, tasks=())
    for version, expected in (("1", backbone), ("2", small_change), ("3", grown), ("4", rewritten)):
        loaded = registry.load_backbone(manifest, version)
        assert all(torch.equal(loaded[n], t) for n, t in expected.items()) and loaded.keys() == expected.keys()


def test_manifest_consistency_checks(tmp_path):
    registry = Registry(tmp_path)
    backbone = registry.put_backbone(BACKBONE)
    mask = registry.put_part("masks", VALID["masks"], BACKBONE)
    with pytest.raises(ManifestError, match=r"needs backbone version '7', which the manifest does not have \(versions: 1\)"):
        Manifest(model="m", generation=1, architecture={}, input_shape=(8,), backbones={"1": backbone},
                 tasks=(TaskEntry(0, "t0", "supsup", "7", 3, {"masks": mask}),))
    with pytest.raises(ManifestError, match="broken delta chain"):
        Manifest(model="m", generation=1, architecture={}, input_shape=(8,),
                 backbones={"1": type(backbone)(backbone.blob, base="2"), "2": type(backbone)(backbone.blob, base="1")}, tasks=())
    with pytest.raises(ManifestError, match="can only share earlier tasks"):
        TaskEntry(1, "t1", "packnet-share", "1", 3, {}, shares=(1,))
    assert TaskEntry(2, "t2", "packnet-share", "1", 3, {}, shares=[0, 1]).shares == (0, 1)
