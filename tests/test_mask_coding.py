"""entropy-mask/v1: exact round trips, damage detected, structure exploited, and the codec chooser."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from registry import BlobCorrupt, InvalidArtifact
from registry.codecs import _load, decode, encode, encode_smallest
from registry.kinds import MASK_CODECS
from registry.mask_coding import CODEC

dims = st.integers(1, 12)


@st.composite
def mask_dicts(draw) -> dict[str, torch.Tensor]:
    """1-3 masks whose shapes chain like a network's layers (MLP or conv), or arbitrary shapes."""
    kind = draw(st.sampled_from(["mlp", "conv", "any"]))
    count = draw(st.integers(1, 3))
    if kind == "any":
        shapes = [tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))) for _ in range(count)]
    else:
        units = draw(st.lists(dims, min_size=count + 1, max_size=count + 1))
        kernel = (draw(st.integers(1, 3)),) * 2 if kind == "conv" else ()
        shapes = [(units[i + 1], units[i], *kernel) for i in range(count)]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    masks = {}
    for i, shape in enumerate(shapes):
        density = draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1))
        spread = draw(st.sampled_from([0.0, 0.9]))  # 0: iid; 0.9: rows of different densities
        row_density = density * (1 - spread * torch.rand(shape[:1], generator=generator))
        row_density = row_density.reshape(shape[:1] + (1,) * (len(shape) - 1))
        masks[f"layer{i}.weight"] = torch.rand(shape, generator=generator) < row_density
    return masks


def assert_same(decoded: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    assert list(decoded) == list(masks)
    for name, mask in masks.items():
        assert decoded[name].dtype == torch.bool and decoded[name].shape == mask.shape
        assert torch.equal(decoded[name], mask)


def random_mask(shape: tuple[int, ...], density: float) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) < density


def structured_mask(rows: int = 256, cols: int = 256) -> torch.Tensor:
    """Half the rows keep 1% of their weights, the other half 40%: a typical row structure."""
    generator = torch.Generator().manual_seed(0)
    row_density = torch.where(torch.rand(rows, 1, generator=generator) < 0.5, 0.01, 0.4)
    return torch.rand(rows, cols, generator=generator) < row_density


@settings(max_examples=60, deadline=None)
@given(masks=mask_dicts())
@example(masks={"w": torch.zeros(1, dtype=torch.bool)})
@example(masks={"w": torch.ones(1, 1, dtype=torch.bool)})
@example(masks={"a": torch.zeros(7, 5, dtype=torch.bool), "b": torch.ones(3, 7, dtype=torch.bool)})
@example(masks={"conv": torch.rand(6, 4, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.2})
@example(masks={})
def test_round_trip_is_exact(masks):
    assert_same(decode(CODEC, encode(CODEC, masks)), masks)


def test_round_trip_of_large_structured_and_random_layers():
    masks = {
        "fc0.weight": structured_mask(96, 64),
        "fc1.weight": random_mask((80, 96), 0.5),  # incompressible: stored bitpacked
        "fc2.weight": random_mask((10, 80), 0.05),
    }
    data = encode(CODEC, masks)
    assert_same(decode(CODEC, data), masks)
    models = {name: model for name, _, _, model in _load(data)[1]["layers"]}
    assert models["fc0.weight"] != 0 and models["fc2.weight"] != 0 and models["fc1.weight"] == 0


def test_encoding_is_deterministic():
    masks = {"w": structured_mask(64, 32)}
    assert encode(CODEC, masks) == encode(CODEC, masks)


def test_row_structure_beats_bitpacking_and_the_iid_entropy():
    mask = structured_mask()
    entropy_bytes, bitmask_bytes = len(encode(CODEC, {"w": mask})), len(encode("bitmask/v1", {"w": mask}))
    d = mask.float().mean().item()
    iid_bytes = mask.numel() * -(d * math.log2(d) + (1 - d) * math.log2(1 - d)) / 8
    assert entropy_bytes < 0.6 * bitmask_bytes
    assert entropy_bytes < 0.8 * iid_bytes


def test_a_neighbouring_layer_tells_which_units_are_dead():
    """A conv layer's input channels are the previous layer's rows: empty ones predict each other."""
    generator = torch.Generator().manual_seed(0)
    dead = torch.rand(512, generator=generator) < 0.6
    fc = (torch.rand(512, 8, generator=generator) < 0.4) & ~dead[:, None]  # rows too short to learn alone
    conv = (torch.rand(16, 512, 3, 3, generator=generator) < 0.4) & ~dead[None, :, None, None]

    def payload(masks):
        return _load(encode(CODEC, masks))[0]["code"].numel()

    assert payload({"fc": fc, "conv": conv}) - payload({"conv": conv}) < 0.9 * payload({"fc": fc})


@pytest.mark.parametrize("density", [0.02, 0.5])
def test_chooser_returns_the_smaller_blob_and_it_decodes_exactly(density):
    masks = {"w": structured_mask() if density < 0.5 else random_mask((64, 64), density)}
    codec, data = encode_smallest(MASK_CODECS, masks)
    sizes = {name: len(encode(name, masks)) for name in ("bitmask/v1", CODEC)}
    assert len(data) == min(sizes.values()) and sizes[codec] == len(data)
    assert_same(decode(codec, data), masks)


def test_chooser_prefers_entropy_coding_for_structured_masks():
    assert encode_smallest(MASK_CODECS, {"w": structured_mask()})[0] == CODEC


@pytest.mark.parametrize("where", [0.05, 0.5, 0.99])  # in the bitpacked layer, then in the range-coded words
def test_a_damaged_payload_is_corrupt_and_named(where):
    data = bytearray(encode(CODEC, {"a": structured_mask(), "b": random_mask((20, 256), 0.5)}))  # b: bitpacked
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + int(where * (len(data) - header))] ^= 0x5A
    with pytest.raises(BlobCorrupt, match=f"sha256:abc cannot be decoded as {CODEC}"):
        decode(CODEC, bytes(data), source="sha256:abc")


SMALL = {"w": structured_mask(32, 32)}


@pytest.mark.parametrize(
    "data",
    [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", encode(CODEC, SMALL)[:-5], encode("bitmask/v1", SMALL)],
    ids=["empty", "not-json", "truncated", "a-bitmask-blob"],
)
def test_bytes_that_are_no_entropy_mask_are_corrupt(data):
    with pytest.raises(BlobCorrupt):
        decode(CODEC, data)


def test_non_boolean_masks_are_refused():
    with pytest.raises(InvalidArtifact, match="must be boolean"):
        encode(CODEC, {"w": torch.ones(3, 3)})
