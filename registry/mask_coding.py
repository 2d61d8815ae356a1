"""`entropy-mask/v1`: supermasks range-coded under an adaptive row/column context model.

Why: a trained supermask is not an iid coin flip. Hidden units differ in how many of their weights
survive (at low density whole rows and columns are empty), and a unit's incoming row and outgoing
column in the next layer agree. Coding each bit with a probability that knows this gets well below
both the iid entropy H(density) and zstd/lzma of the bitpacked bytes where masks are sparse (16-23%
below the best of them at densities 0.1-0.05, bench/storage.py); near density 0.5 trained masks are
close to random and no model gains much, so `choose_mask_codec` keeps whichever blob is smaller.

Model. Each mask is a matrix (conv weights [out, in, kh, kw] as [out, in*kh*kw]) split into a grid of
at most 32 x 32 blocks that are coded along anti-diagonals (a wavefront): when block (bi, bj) is coded,
the blocks left of it in its block-row and above it in its block-column are already known. So each bit
has a running estimate of its row's density and its column's density, each shrunk towards a prior
(Beta-style pseudo-counts), and the two are combined in odds space:

    odds(p_ij) = odds(d) * (odds(row_i) / odds(d)) ** w_row * (odds(col_j) / odds(d)) ** w_col

where d is the layer's density (its exact count of ones is stored). The prior of a row (column) is d,
or, when a neighbouring layer is already decoded, the pooled running density of the rows (columns)
whose unit has a similar count of ones in that neighbour (8 rank bins): a unit that keeps few inputs
also keeps few outputs. Layers are coded largest first, so small layers get the large ones as context.
The encoder picks, per layer, the weights w in {0, 1/2, 1}, the pseudo-counts, and whether to use the
neighbour context, by coordinate descent on the exact code length; a layer that no model shrinks by
at least 1% is stored bitpacked (it then decodes some 30x faster). Probabilities are computed from integer
counts with +, -, *, /, sqrt, min and max only, all of which IEEE 754 rounds exactly, so the encoder and
any decoder on any machine get bit-identical probabilities (no exp or log, whose last bit varies).

Container: a safetensors file whose metadata lists the layers in order as `[name, shape, ones, model]`
(`model` 0 = bitpacked, k > 0 = entry k - 1 of `_MODELS`; a layer of all zeros or all ones stores no
bits) plus a CRC-32 of the decoded bits, and one uint8 tensor `code`: the bitpacked layers (in coding
order), then the range-coded words (little-endian uint32).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace
from functools import lru_cache, partial
from itertools import product
from typing import Callable

import constriction
import numpy as np
import torch

from .codecs import _load, _save, register_codec
from .errors import InvalidArtifact
from .packed import PackedMasks

Masks = dict[str, torch.Tensor]
CODEC = "entropy-mask/v1"
_EPS = 1e-5  # probabilities and density estimates are kept in [_EPS, 1 - _EPS]
_GRID = 32  # at most this many blocks per matrix side
_BINS = 8  # rank bins of a neighbouring layer's unit counts
_POOL = 8.0  # pseudo-count of a bin's pooled density prior
_MIN_SAVING = 0.01  # range-code a layer only if that saves 1% of its bits: bitpacked decodes faster
_BERNOULLI = constriction.stream.model.Bernoulli(perfect=False)


@dataclass(frozen=True)
class _Model:
    """One probability model of a layer's bits (see the module docstring)."""

    row_weight: float
    col_weight: float
    row_strength: float  # pseudo-count of the row prior
    col_strength: float
    row_context: bool  # row prior from the next layer's columns instead of d
    col_context: bool  # column prior from the previous layer's rows instead of d


_OPTIONS = {
    "row_weight": (0.0, 0.5, 1.0),
    "col_weight": (0.0, 0.5, 1.0),
    "row_strength": (2.0, 8.0, 32.0, 128.0),
    "col_strength": (2.0, 8.0, 32.0, 128.0),
    "row_context": (False, True),
    "col_context": (False, True),
}
_MODELS = [_Model(*values) for values in product(*_OPTIONS.values())]  # indices are the format: never reorder
_MODEL_INDEX = {model: index for index, model in enumerate(_MODELS)}
_START = _Model(1.0, 1.0, 8.0, 8.0, False, False)  # contexts are switched on where available
_BITPACKED = 0  # model code of a layer stored bitpacked


@dataclass(frozen=True)
class _Geometry:
    """The wavefront order of a rows x cols matrix: element `order[k]` is the k-th coded."""

    rows: int
    cols: int
    order: np.ndarray  # flat indices, in coding order
    row_of: np.ndarray  # row of each coded element
    col_of: np.ndarray
    bounds: tuple[int, ...]  # start of each step in `order`, and the end
    row_seen: np.ndarray  # [step, row]: how many of the row's elements earlier steps coded
    col_seen: np.ndarray  # [step, column]


@lru_cache(maxsize=8)
def _geometry(rows: int, cols: int) -> _Geometry:
    """Cached per shape, because every task of a model has the same shapes."""
    row_block = np.arange(rows) // -(-rows // _GRID)
    col_block = np.arange(cols) // -(-cols // _GRID)
    step = np.add.outer(row_block, col_block).astype(np.int16).ravel()
    order = np.argsort(step, kind="stable")  # a radix sort: steps are small integers
    bounds = tuple(int(b) for b in np.concatenate(([0], np.cumsum(np.bincount(step)))))
    index = np.int32 if rows * cols < 2**31 else np.int64
    return _Geometry(
        rows, cols, order.astype(index), (order // cols).astype(index), (order % cols).astype(index), bounds,
        _seen(row_block, col_block, len(bounds) - 1), _seen(col_block, row_block, len(bounds) - 1),
    )


def _seen(own_block: np.ndarray, other_block: np.ndarray, steps: int) -> np.ndarray:
    """[step, line]: elements of each line coded before the step (those in earlier blocks across)."""
    starts = np.concatenate(([0], np.cumsum(np.bincount(other_block))))  # elements in blocks < k
    blocks_done = np.clip(np.arange(steps)[:, None] - own_block[None, :], 0, starts.size - 1)
    return starts[blocks_done].astype(np.float64)


@dataclass(frozen=True)
class _Layer:
    """What both coder sides know about a layer before its bits: shape, ones, context bins."""

    geometry: _Geometry
    ones: int
    row_bins: np.ndarray | None  # rank bin of each row's unit in the next layer, if decoded first
    col_bins: np.ndarray | None  # rank bin of each column's unit in the previous layer

    @property
    def density(self) -> float:
        return min(max(self.ones / (self.geometry.rows * self.geometry.cols), _EPS), 1 - _EPS)


def _factor(
    ones: np.ndarray, seen: np.ndarray, bins: np.ndarray | None, strength: float, weight: float, density: float
) -> np.ndarray:
    """Per row (or column): (odds of its shrunk running density / odds(d)) ** weight."""
    if bins is None:
        prior: np.ndarray | float = density
    else:
        pooled = np.bincount(bins, ones, _BINS) + _POOL * density
        prior = (pooled / (np.bincount(bins, seen, _BINS) + _POOL))[bins]
    estimate = np.clip((ones + strength * prior) / (seen + strength), _EPS, 1 - _EPS)
    ratio = estimate / (1 - estimate) / (density / (1 - density))
    return np.sqrt(ratio) if weight == 0.5 else ratio


def _run(
    layer: _Layer, model: _Model, bits_of_step: Callable[[slice, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Walk the wavefront; `bits_of_step(step, p)` returns the step's bits (known or decoded).

    Returns the bits and their probabilities, both in coding order.
    """
    g, d = layer.geometry, layer.density
    base = d / (1 - d)
    row_ones, col_ones = np.zeros(g.rows), np.zeros(g.cols)
    row_bins = layer.row_bins if model.row_context else None
    col_bins = layer.col_bins if model.col_context else None
    bits, probabilities = np.empty(g.order.size, np.int32), np.empty(g.order.size)
    for index, (start, end) in enumerate(zip(g.bounds[:-1], g.bounds[1:])):
        step, rows, cols = slice(start, end), g.row_of[start:end], g.col_of[start:end]
        if model.row_weight:
            odds = (base * _factor(row_ones, g.row_seen[index], row_bins, model.row_strength, model.row_weight, d))[rows]
        else:
            odds = np.full(end - start, base)
        if model.col_weight:
            odds *= _factor(col_ones, g.col_seen[index], col_bins, model.col_strength, model.col_weight, d)[cols]
        p = probabilities[step]
        np.divide(odds, odds + 1, out=p)
        np.clip(p, _EPS, 1 - _EPS, out=p)
        bits[step] = bits_of_step(step, p)
        row_ones += np.bincount(rows, bits[step], g.rows)
        col_ones += np.bincount(cols, bits[step], g.cols)
    return bits, probabilities


def _code_length(layer: _Layer, model: _Model, bits: np.ndarray) -> float:
    """Bits the range coder spends on `bits` (in coding order) under `model`."""
    _, p = _run(layer, model, lambda step, _: bits[step])
    return float(-np.log2(np.where(bits == 1, p, 1 - p)).sum())


def _choose_model(layer: _Layer, bits: np.ndarray) -> _Model | None:
    """Coordinate descent over `_OPTIONS`; None when no model saves `_MIN_SAVING` of the bitpacked size."""
    costs: dict[_Model, float] = {}

    def cost(model: _Model) -> float:
        if model not in costs:
            costs[model] = _code_length(layer, model, bits)
        return costs[model]

    best = replace(_START, row_context=layer.row_bins is not None, col_context=layer.col_bins is not None)
    improved = True
    while improved:
        improved = False
        for field in fields(_Model):
            for value in _OPTIONS[field.name]:
                candidate = replace(best, **{field.name: value})
                if (candidate.row_context and layer.row_bins is None) or (candidate.col_context and layer.col_bins is None):
                    continue
                if cost(candidate) < cost(best):
                    best, improved = candidate, True
    return best if cost(best) < (1 - _MIN_SAVING) * bits.size else None


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """A mask of `shape` as a rows x cols matrix (conv [out, in, kh, kw] as [out, in*kh*kw])."""
    count = int(np.prod(shape, dtype=np.int64))
    rows = shape[0] if len(shape) >= 2 else 1
    return (rows, count // rows) if count else (0, 0)


def _chained(first: tuple[int, ...], second: tuple[int, ...]) -> bool:
    """Whether `second` consumes the output units of `first` (its dim 1 is first's dim 0), both non-empty."""
    return len(first) >= 2 and len(second) >= 2 and first[0] == second[1] and min(first + second) > 0


def _rank_bins(unit_ones: np.ndarray, repeat: int) -> np.ndarray:
    """Rank bin (0.._BINS-1) of each unit by its count of ones, repeated for its `repeat` columns."""
    rank = np.empty(unit_ones.size, np.int64)
    rank[np.argsort(unit_ones, kind="stable")] = np.arange(unit_ones.size)
    return np.repeat(rank * _BINS // unit_ones.size, repeat)


def _coding_order(shapes: list[tuple[int, ...]]) -> list[int]:
    """Largest layer first (ties in dict order): small layers then have large neighbours as context."""
    return sorted(range(len(shapes)), key=lambda i: (-int(np.prod(shapes[i], dtype=np.int64)), i))


def _layer(index: int, shapes: list[tuple[int, ...]], ones: int, decoded: dict[int, np.ndarray]) -> _Layer:
    """What the decoder knows of layer `index` once the layers in `decoded` (as matrices) are done."""
    shape = shapes[index]
    row_bins = col_bins = None
    if index + 1 in decoded and _chained(shape, shapes[index + 1]):
        following = decoded[index + 1].reshape(shapes[index + 1][0], shape[0], -1)
        row_bins = _rank_bins(following.sum(axis=(0, 2)), 1)
    if index - 1 in decoded and _chained(shapes[index - 1], shape):
        col_bins = _rank_bins(decoded[index - 1].sum(axis=1), _matrix(shape)[1] // shape[1])
    return _Layer(_geometry(*_matrix(shape)), ones, row_bins, col_bins)


@dataclass(frozen=True)
class _Header:
    """One entry of the container's layer list: what the decoder reads before any bits."""

    name: str
    shape: tuple[int, ...]
    ones: int
    model: int  # _BITPACKED, or 1 + index into _MODELS

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def coded(self) -> bool:
        """Whether the layer has bits to store at all (it is neither all zeros nor all ones)."""
        return 0 < self.ones < self.size

    @staticmethod
    def parse(entry: object) -> _Header:
        """Validate one metadata entry; anything malformed is a ValueError (BlobCorrupt to callers)."""
        try:
            name, shape, ones, model = entry  # type: ignore[misc]
            header = _Header(str(name), tuple(int(s) for s in shape), int(ones), int(model))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed layer entry {entry!r}: {exc}") from None
        if min(header.shape, default=0) < 0 or not 0 <= header.ones <= header.size or not 0 <= header.model <= len(_MODELS):
            raise ValueError(f"layer entry {entry!r} is out of range")
        return header


def _checksum(matrices: list[np.ndarray]) -> int:
    """CRC-32 of all masks' bits: a damaged range-coded stream still decodes, into other bits."""
    return zlib.crc32(b"".join(np.packbits(m, axis=None).tobytes() for m in matrices))


def _encode(masks: Masks) -> bytes:
    """Encoder of `entropy-mask/v1`: a dict of boolean masks -> safetensors bytes."""
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise InvalidArtifact(f"mask '{name}' must be boolean, got {mask.dtype}")
    shapes = [tuple(mask.shape) for mask in masks.values()]
    matrices = [mask.detach().cpu().numpy().reshape(_matrix(shape)) for mask, shape in zip(masks.values(), shapes)]
    models = [_BITPACKED] * len(shapes)
    packed, symbols, probabilities = [], [], []
    decoded: dict[int, np.ndarray] = {}
    for index in _coding_order(shapes):
        matrix, ones = matrices[index], int(matrices[index].sum())
        layer = _layer(index, shapes, ones, decoded) if 0 < ones < matrix.size else None
        decoded[index] = matrix
        if layer is None:
            continue
        bits = matrix.ravel()[layer.geometry.order].astype(np.int32)
        model = _choose_model(layer, bits)
        if model is None:
            packed.append(np.packbits(matrix, axis=None, bitorder="little"))
            continue
        models[index] = _MODEL_INDEX[model] + 1
        symbols.append(bits)
        probabilities.append(_run(layer, model, lambda step, _: bits[step])[1])
    encoder = constriction.stream.queue.RangeEncoder()
    if symbols:
        encoder.encode(np.concatenate(symbols), _BERNOULLI, np.concatenate(probabilities))
    words = encoder.get_compressed().astype("<u4").view(np.uint8)
    code = torch.from_numpy(np.concatenate([*packed, words]).astype(np.uint8))
    layers = [[name, list(shape), int(m.sum()), model] for name, shape, m, model in zip(masks, shapes, matrices, models)]
    return _save({"code": code}, {"layers": layers, "crc32": _checksum(matrices)})


def _decode(data: bytes) -> PackedMasks:
    """Decoder of `entropy-mask/v1`, to masks held bitpacked (registry/packed.py); malformed or damaged
    bytes raise ValueError."""
    tensors, meta = _load(data)
    if not isinstance(meta["layers"], list) or tensors["code"].dtype != torch.uint8 or tensors["code"].dim() != 1:
        raise ValueError("not an entropy-mask/v1 container (a layer list and one uint8 'code' tensor)")
    headers = [_Header.parse(entry) for entry in meta["layers"]]
    code = tensors["code"].numpy()
    packed_size = sum(-(-h.size // 8) for h in headers if h.coded and h.model == _BITPACKED)
    if code.size < packed_size or (code.size - packed_size) % 4:
        raise ValueError(f"{code.size} code bytes are not {packed_size} bitpacked bytes plus whole 4-byte words")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(code[packed_size:].tobytes(), "<u4").astype(np.uint32))
    shapes = [h.shape for h in headers]
    decoded: dict[int, np.ndarray] = {}
    offset = 0
    for index in _coding_order(shapes):
        header = headers[index]
        if not header.coded:
            flat = np.full(header.size, header.ones > 0)
        elif header.model == _BITPACKED:
            packed, offset = code[offset : offset + -(-header.size // 8)], offset + -(-header.size // 8)
            flat = np.unpackbits(packed, count=header.size, bitorder="little").astype(bool)
        else:
            layer = _layer(index, shapes, header.ones, decoded)
            flat = np.empty(header.size, bool)
            flat[layer.geometry.order] = _run(layer, _MODELS[header.model - 1], partial(_decode_step, decoder))[0]
        decoded[index] = flat.reshape(_matrix(header.shape))
    matrices = [decoded[i] for i in range(len(headers))]
    if _checksum(matrices) != meta["crc32"]:
        raise ValueError("decoded masks fail their CRC-32: the code bytes are damaged")
    return PackedMasks.pack({h.name: torch.from_numpy(m.reshape(h.shape)) for h, m in zip(headers, matrices)})


def _decode_step(decoder: constriction.stream.queue.RangeDecoder, _: slice, probabilities: np.ndarray) -> np.ndarray:
    """Decode one wavefront step; constriction reports impossible input as AssertionError."""
    try:
        return decoder.decode(_BERNOULLI, probabilities)
    except AssertionError as exc:
        raise ValueError(f"range-coded bits are invalid: {exc}") from None


register_codec(CODEC, _encode, _decode)
