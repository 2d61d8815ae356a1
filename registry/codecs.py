"""Codecs: how each kind of artifact becomes bytes in a blob and back.

Every codec writes a safetensors container (no pickle), so blobs are self-describing: bit payloads
are uint8 tensors and their logical shapes live in the container's string metadata.

* `bitmask/v1`: a dict of boolean masks, each bitpacked (1 bit per weight, numpy packbits); decodes to
  `PackedMasks` (registry/packed.py), which keeps the bits packed in memory.
* `signed-constant/v1`: a fixed random backbone whose weights are +-scale per layer, stored as
  one sign bit per weight plus one float32 scale per layer.
* `tensors/v1`: a dict of tensors as plain safetensors.
* `delta/v1`: a backbone version as a sparse delta of its base version (see `sparse_delta`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import BlobUndecodable, InvalidArtifact, unknown
from .packed import PackedMasks, pack_bits, unpack_bits

Tensors = dict[str, torch.Tensor]
_ENCODERS: dict[str, Callable[[Any], bytes]] = {}
_DECODERS: dict[str, Callable[[bytes], Any]] = {}


def register_codec(name: str, encoder: Callable[[Any], bytes], decoder: Callable[[bytes], Any]) -> None:
    """Make `name` usable in BlobRef.codec."""
    _ENCODERS[name] = encoder
    _DECODERS[name] = decoder


def encode(codec: str, value: Any) -> bytes:
    if codec not in _ENCODERS:
        raise unknown("codec", codec, _ENCODERS)
    return _ENCODERS[codec](value)


def encode_smallest(candidates: tuple[str, ...], value: Any) -> tuple[str, bytes]:
    """Encode `value` with each codec of `candidates` and return the smallest as (codec, bytes);
    ties go to the earlier candidate (list the faster-decoding codec first)."""
    encodings = [(codec, encode(codec, value)) for codec in candidates if codec in _ENCODERS]
    return min(encodings, key=lambda item: len(item[1]))


def decode(codec: str, data: bytes, source: str = "blob") -> Any:
    """Decode `data`; undecodable bytes raise BlobUndecodable (a BlobCorrupt) naming `source`."""
    if codec not in _DECODERS:
        raise unknown("codec", codec, _DECODERS)
    try:
        return _DECODERS[codec](data)
    except (SafetensorError, ValueError, KeyError, RuntimeError) as exc:
        raise BlobUndecodable(f"{source} cannot be decoded as {codec}: {exc}") from None


def _save(tensors: Tensors, meta: dict[str, Any]) -> bytes:
    return st_save(tensors, metadata={"maskbank": json.dumps(meta, sort_keys=True)})


def _load(data: bytes) -> tuple[Tensors, dict[str, Any]]:
    tensors = _decode_tensors(data)  # validates the whole container before the header is trusted
    length = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, then JSON
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return tensors, json.loads(metadata["maskbank"])


def _encode_masks(masks: Mapping[str, torch.Tensor]) -> bytes:
    packed = PackedMasks.pack(masks)
    return _save(packed.packed, {"shapes": {name: list(shape) for name, shape in packed.shapes.items()}})


def _decode_masks(data: bytes) -> PackedMasks:
    """The stored bits as they are, no unpacking (registry/packed.py)."""
    packed, meta = _load(data)
    shapes = meta["shapes"]
    return PackedMasks({name: packed[name] for name in shapes}, {name: tuple(shape) for name, shape in shapes.items()})


def signed_constant(shape: tuple[int, ...], generator: torch.Generator, gain: float = 2**0.5) -> torch.Tensor:
    """Signed-constant init (SupSup): sign(N(0,1)) * gain / sqrt(fan_in), in float32."""
    fan_in = int(np.prod(shape[1:]))
    scale = torch.tensor(gain / fan_in**0.5, dtype=torch.float32)
    signs = torch.randn(shape, generator=generator) >= 0
    return torch.where(signs, scale, -scale)


def _encode_signed_constant(weights: Tensors) -> bytes:
    tensors, shapes = {}, {}
    for name, weight in weights.items():
        scale = weight.abs().max().to(torch.float32)
        if weight.dtype != torch.float32 or not torch.all(weight.abs() == scale):
            raise InvalidArtifact(f"backbone weight '{name}' is not signed-constant (+-one float32 scale per layer)")
        tensors[f"{name}.signs"] = pack_bits(weight > 0)
        tensors[f"{name}.scale"] = scale.reshape(1)
        shapes[name] = list(weight.shape)
    return _save(tensors, {"shapes": shapes})


def _decode_signed_constant(data: bytes) -> Tensors:
    tensors, meta = _load(data)
    weights = {}
    for name, shape in meta["shapes"].items():
        signs = unpack_bits(tensors[f"{name}.signs"], tuple(shape))
        scale = tensors[f"{name}.scale"][0]
        weights[name] = torch.where(signs, scale, -scale)
    return weights


def _encode_tensors(tensors: Tensors) -> bytes:
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()})


def _decode_tensors(data: bytes) -> Tensors:
    """The tensors by name, in sorted order: safetensors hands them back in an order that changes from one
    process to the next, which made a computation over `.values()` (a float sum) differ between runs."""
    return dict(sorted(st_load(data).items()))


register_codec("bitmask/v1", _encode_masks, _decode_masks)
register_codec("signed-constant/v1", _encode_signed_constant, _decode_signed_constant)
register_codec("tensors/v1", _encode_tensors, _decode_tensors)


def sparse_delta(base: Tensors, new: Tensors) -> Tensors:
    """What changed from `base` to `new`: for a tensor of unchanged shape, the flat indices
    ('NAME.index', int64) and new values ('NAME.values') of the elements that differ; a tensor
    that is new or changed shape (a grown layer) is kept whole ('NAME.full')."""
    if missing := set(base) - set(new):
        raise InvalidArtifact(f"a backbone version cannot drop tensors of its base: {sorted(missing)}")
    delta = {}
    for name, tensor in new.items():
        old = base.get(name)
        if old is None or old.shape != tensor.shape or old.dtype != tensor.dtype:
            delta[f"{name}.full"] = tensor
            continue
        index = torch.nonzero((old != tensor).flatten()).flatten()
        delta[f"{name}.index"] = index
        delta[f"{name}.values"] = tensor.flatten()[index]
    return delta


def apply_delta(base: Tensors, delta: Tensors) -> Tensors:
    """Inverse of sparse_delta: the full tensors of the new version."""
    result = dict(base)
    for key, tensor in delta.items():
        name, kind = key.rsplit(".", 1)
        if kind == "full":
            result[name] = tensor
        elif kind == "index":
            if name not in base:
                raise ValueError(f"delta changes '{name}', which its base does not have")
            flat = base[name].flatten().clone()
            flat[tensor] = delta[f"{name}.values"]
            result[name] = flat.reshape(base[name].shape)
    return result


register_codec("delta/v1", _encode_tensors, _decode_tensors)
