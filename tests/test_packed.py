"""PackedMasks: boolean masks held bitpacked, unpacked to bool on access and straight to 0 / 1 floats."""

import pytest
import torch

from registry import InvalidArtifact, PackedMasks
from registry.audit import mask_stats
from registry.codecs import decode, encode

SHAPES = {"fc.weight": (3, 5), "conv.weight": (4, 3, 3, 3), "odd": (7,), "empty": (0, 4), "one": (1,)}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def masks(density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) < density for name, shape in SHAPES.items()}


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_round_trip_keeps_names_shapes_and_bits(density):
    original = masks(density)
    packed = PackedMasks.pack(original)
    assert list(packed) == list(original) and len(packed) == len(original)
    for name, mask in original.items():
        assert packed.shapes[name] == mask.shape
        assert packed[name].dtype == torch.bool and torch.equal(packed[name], mask)


def test_holds_one_bit_per_element_rounded_up_per_mask():
    packed = PackedMasks.pack(masks())
    assert packed.nbytes == sum((torch.Size(s).numel() + 7) // 8 for s in SHAPES.values()) == 2 + 14 + 1 + 0 + 1


def test_a_non_contiguous_mask_packs_in_its_logical_order():
    mask = (torch.rand(7, 5, generator=torch.Generator().manual_seed(1)) < 0.5).t()
    assert torch.equal(PackedMasks.pack({"w": mask})["w"], mask)


@pytest.mark.parametrize("dtype", FLOATS)
def test_as_float_is_the_mask_in_dtype_bit_for_bit(dtype):
    original = masks()
    packed = PackedMasks.pack(original)
    for name, mask in original.items():
        fresh = packed.as_float(name, dtype)
        into = torch.full(mask.shape, float("nan"), dtype=dtype)
        written = packed.as_float(name, dtype, out=into)
        assert written is into and fresh.dtype == dtype and fresh.shape == mask.shape
        assert torch.equal(fresh, mask.to(dtype)) and torch.equal(written, mask.to(dtype))


def test_as_float_writes_into_a_contiguous_view_of_a_larger_buffer():
    original = masks()
    row = torch.full((200,), -1.0)
    out = row[10:118].view(4, 3, 3, 3)
    PackedMasks.pack(original).as_float("conv.weight", out=out)
    assert torch.equal(out, original["conv.weight"].float()) and (row[:10] == -1).all() and (row[118:] == -1).all()


@pytest.mark.parametrize("out, message", [
    (torch.empty(5, 3), r"got cpu torch.float32 \[5, 3\]"),
    (torch.empty(3, 5, dtype=torch.float64), r"got cpu torch.float64 \[3, 5\]"),
    (torch.empty(5, 3).t(), r"got a non-contiguous cpu torch.float32 \[3, 5\]"),
])
def test_as_float_refuses_a_buffer_it_cannot_fill(out, message):
    packed = PackedMasks.pack(masks())
    with pytest.raises(ValueError, match=r"a buffer for mask 'fc.weight' must be a contiguous CPU torch.float32 "
                                         r"tensor of shape \[3, 5\], " + message):
        packed.as_float("fc.weight", torch.float32, out=out)


def test_as_float_refuses_a_dtype_that_is_not_floating():
    with pytest.raises(ValueError, match="masks unpack to a floating dtype, not torch.int32"):
        PackedMasks.pack(masks()).as_float("fc.weight", torch.int32)


def test_pack_refuses_a_mask_that_is_not_boolean_and_keeps_packed_masks():
    with pytest.raises(InvalidArtifact, match="mask 'w' must be boolean, got torch.uint8"):
        PackedMasks.pack({"w": torch.ones(3, dtype=torch.uint8)})
    packed = PackedMasks.pack(masks())
    assert PackedMasks.pack(packed) is packed


def test_packed_bytes_must_match_their_shapes():
    with pytest.raises(ValueError, match=r"2 packed bytes cannot hold 25 bits of shape \[5, 5\]"):
        PackedMasks({"w": torch.zeros(2, dtype=torch.uint8)}, {"w": (5, 5)})
    with pytest.raises(ValueError, match="name different masks"):
        PackedMasks({"w": torch.zeros(1, dtype=torch.uint8)}, {"v": (5,)})


@pytest.mark.parametrize("codec", ["bitmask/v1", "entropy-mask/v1"])
def test_mask_codecs_decode_to_packed_masks(codec):
    original = masks(0.1)
    decoded = decode(codec, encode(codec, original))
    assert isinstance(decoded, PackedMasks) and decoded.keys() == original.keys()
    assert all(torch.equal(decoded[name], mask) for name, mask in original.items())


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_audit_counts_the_kept_weights_from_the_packed_bytes(density):
    """mask_stats counts ones on the packed bytes: the zero padding of the last byte never counts."""
    original = masks(density, seed=3)
    stats = mask_stats(PackedMasks.pack(original))
    weights, kept = sum(m.numel() for m in original.values()), sum(int(m.sum()) for m in original.values())
    assert stats.weights == weights and stats.index16_bytes == 2.0 * kept
    assert stats.density == pytest.approx(kept / weights)



@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bits_unpack_every_mask_in_one_buffer(density):
    """`bits` (how a GPU unpacks: shift-and-mask, over one buffer of all masks after `to`) gives every
    mask as 0 / 1 of its shape, ragged and empty masks included; `to` keeps the names, shapes and bits."""
    original = masks(density, seed=4)
    packed = PackedMasks.pack(original)
    moved = packed.to("cpu")
    assert moved is not packed and moved.to("cpu") is moved and moved.nbytes == packed.nbytes
    for unpacked in (packed.bits(), moved.bits()):
        assert list(unpacked) == list(original)
        for name, mask in original.items():
            assert unpacked[name].dtype == torch.uint8 and torch.equal(unpacked[name], mask.to(torch.uint8))
    for name, mask in original.items():
        assert torch.equal(moved[name], mask)
    assert PackedMasks({}, {}).bits() == {}
