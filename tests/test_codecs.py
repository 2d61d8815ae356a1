"""Round trips of every codec, and undecodable bytes reported as corrupt."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import BlobCorrupt, InvalidArtifact, UnknownName
from registry.codecs import decode, encode, pack_bits, signed_constant, unpack_bits

shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, density=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_bitmask_round_trip(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    masks = {"fc0.weight": torch.rand(shape, generator=generator) < density, "fc1.weight": torch.ones(3, 5, dtype=torch.bool)}
    data = encode("bitmask/v1", masks)
    decoded = decode("bitmask/v1", data)
    assert decoded.keys() == masks.keys()
    for name in masks:
        assert decoded[name].dtype == torch.bool and torch.equal(decoded[name], masks[name])


def test_bitmask_costs_one_bit_per_weight():
    mask = torch.rand(1000, 1000) < 0.5
    assert pack_bits(mask).numel() == 1_000_000 // 8
    assert len(encode("bitmask/v1", {"w": mask})) < 1_000_000 // 8 + 200


def test_unpack_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (5, 5))


def test_signed_constant_round_trip_is_exact():
    generator = torch.Generator().manual_seed(0)
    backbone = {"fc0.weight": signed_constant((300, 64), generator), "fc1.weight": signed_constant((10, 300), generator)}
    assert torch.allclose(backbone["fc0.weight"].abs(), torch.tensor(2**0.5 / 8))
    data = encode("signed-constant/v1", backbone)
    assert len(data) < (300 * 64 + 10 * 300) // 8 + 600  # one bit per weight plus the container header
    decoded = decode("signed-constant/v1", data)
    for name, weight in backbone.items():
        assert torch.equal(decoded[name], weight)


def test_signed_constant_refuses_trained_weights():
    with pytest.raises(InvalidArtifact, match="not signed-constant"):
        encode("signed-constant/v1", {"w": torch.randn(4, 4)})


def test_tensors_round_trip():
    tensors = {"mean": torch.randn(7), "var": torch.rand(7, dtype=torch.float64)}
    decoded = decode("tensors/v1", encode("tensors/v1", tensors))
    assert all(torch.equal(decoded[k], v) for k, v in tensors.items())


def test_undecodable_bytes_are_corrupt_and_named():
    with pytest.raises(BlobCorrupt, match="sha256:abc cannot be decoded as bitmask/v1"):
        decode("bitmask/v1", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", source="sha256:abc")


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(UnknownName, match=r"Unknown codec 'zip' \(known: bitmask/v1, .*tensors/v1\)"):
        encode("zip", {})


def test_tensors_decode_in_sorted_order_every_time():
    """safetensors hands tensors back in an order that changes between processes and calls; a float
    reduction over a decoded dict's values (SPG's head scale) then differed between runs."""
    tensors = {f"layer{i}.weight": torch.full((2,), float(i)) for i in (3, 10, 1, 2)}
    for codec in ("tensors/v1", "delta/v1"):
        data = encode(codec, tensors)
        orders = {tuple(decode(codec, data)) for _ in range(20)}
        assert orders == {tuple(sorted(tensors))}
