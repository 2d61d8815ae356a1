"""The storage audit: what each task of a model costs, against the references users compare with.

For every part of every task: bytes and bits per backbone weight; for masks also the ratios of
(a) a dense 32-bit copy of the network, (b) SupSup's 16-bit index lists, (c) the iid entropy
bound at the mask's density and (d) zstd -19 / lzma of the bitpacked mask, each divided by the
stored bytes (above 1: the registry stores less). Shared bytes (backbone versions) are amortised
over the tasks. ImpressLearn's per-task cost follows the paper's Table 2.
"""

from __future__ import annotations

import lzma
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import torch
import zstandard

from .catalog import Registry
from .errors import ManifestError
from .folders import save_figure
from .manifest import Manifest
from .packed import PackedMasks


@dataclass
class MaskStats:
    weights: int
    density: float
    index16_bytes: float  # SupSup's sparse storage: one 16-bit index per kept weight
    entropy_bytes: float  # n * H(density) / 8
    zstd_bytes: int
    lzma_bytes: int


@dataclass
class PartAudit:
    task: int
    name: str
    part: str
    codec: str
    bytes: int
    bits_per_weight: float
    vs_dense: float
    mask: MaskStats | None = None
    vs_index16: float | None = None
    vs_entropy: float | None = None
    vs_zstd: float | None = None
    vs_lzma: float | None = None


@dataclass
class ModelAudit:
    model: str
    generation: int
    tasks: int
    backbone_weights: int
    dense_model_bytes: int  # one 32-bit copy of the network
    shared_bytes: int  # backbone versions and other shared parts
    state_bytes: int = 0  # training-only state (KKT scores, SPG importance, EWC Fisher): stored, never served
    parts: list[PartAudit] = field(default_factory=list)
    history_bytes: int = 0  # distinct blobs of every generation: what the registry keeps for the model (gc too)
    growth: list[tuple[int, int]] = field(default_factory=list)  # per generation: (its tasks, history bytes up to it)
    unreadable: list[int] = field(default_factory=list)  # earlier generations left out of growth and history

    @property
    def task_bytes(self) -> list[int]:
        """Bytes of each task's own parts, in task order."""
        totals: dict[int, int] = {}
        for part in self.parts:
            totals[part.task] = totals.get(part.task, 0) + part.bytes
        return [totals[t] for t in sorted(totals)]

    @property
    def registry_bytes(self) -> int:
        return self.shared_bytes + sum(self.task_bytes) + self.state_bytes

    def to_dict(self) -> dict:
        per_task = self.task_bytes
        return {
            **asdict(self),
            "task_bytes": per_task,
            "shared_bytes_per_task": self.shared_bytes / max(1, self.tasks),
            "registry_bytes": self.registry_bytes,
            "dense_per_task_bytes": self.dense_model_bytes * self.tasks,
            "compression_vs_dense_per_task": self.dense_model_bytes * self.tasks / max(1, self.registry_bytes),
        }


def binary_entropy(p: float) -> float:
    """H(p) in bits."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def mask_stats(masks: Mapping[str, torch.Tensor]) -> MaskStats:
    masks = PackedMasks.pack(masks)
    weights = sum(shape.numel() for shape in masks.shapes.values())
    kept = sum(int(np.bitwise_count(p.numpy()).sum(dtype=np.int64)) for p in masks.packed.values())  # padding bits are 0
    packed = b"".join(p.numpy().tobytes() for p in masks.packed.values())
    density = kept / weights if weights else 0.0
    return MaskStats(
        weights=weights,
        density=density,
        index16_bytes=2.0 * kept,
        entropy_bytes=weights * binary_entropy(density) / 8,
        zstd_bytes=len(zstandard.ZstdCompressor(level=19).compress(packed)),
        lzma_bytes=len(lzma.compress(packed, preset=9 | lzma.PRESET_EXTREME)),
    )


def impresslearn_cost(mask_bytes: float, basis_size: int, layers: int, max_tasks: int) -> tuple[float, float]:
    """ImpressLearn's per-task cost Phi and compression Cx (paper Table 2):
    Phi = (|M| * mask bytes + T_max * |alpha| * 4) / T_max with |alpha| = |M| * layers, Cx = mask bytes / Phi,
    where a mask is counted as SupSup's 16-bit index list."""
    phi = (basis_size * mask_bytes + max_tasks * basis_size * layers * 4) / max_tasks
    return phi, mask_bytes / phi


def audit(registry: Registry, model: str) -> ModelAudit:
    """Audit the newest generation of `model`, reading (and verifying) every blob it references."""
    manifest = registry.manifest(model)
    backbone_weights = max(
        sum(t.numel() for t in registry.load_backbone(manifest, version).values()) for version in manifest.backbones
    )
    result = ModelAudit(
        model=model, generation=manifest.generation, tasks=len(manifest.tasks), backbone_weights=backbone_weights,
        dense_model_bytes=4 * backbone_weights,
        shared_bytes=sum(v.blob.size for v in manifest.backbones.values()) + sum(r.size for r in manifest.shared.values()),
        state_bytes=sum(r.size for t in manifest.tasks for r in t.state.values()),
    )
    for task in manifest.tasks:
        for part, ref in task.parts.items():
            result.parts.append(_audit_part(registry, task.id, task.name, part, ref, result))
    _add_growth(registry, manifest, result)
    result.history_bytes = result.growth[-1][1]
    return result


def _add_growth(registry: Registry, newest: Manifest, result: ModelAudit) -> None:
    """Per generation of `newest`'s model up to it: its task count, and the bytes of the distinct blobs it
    and every earlier generation reference (what the registry holds for the model then; `registry gc`
    keeps every generation's blobs). More than the newest generation's own blobs where a generation
    replaced a backbone version or a shared part. An earlier generation that cannot be read is left
    out and listed (verify says why), rather than stop the audit of the newest."""
    blobs: dict[str, int] = {}
    for generation in [g for g in registry.generations(newest.model) if g <= newest.generation]:
        try:  # the newest is read already
            manifest = newest if generation == newest.generation else registry.manifest(newest.model, generation)
        except ManifestError:
            result.unreadable.append(generation)
            continue
        blobs.update((ref.digest, ref.size) for ref in manifest.blob_refs())
        result.growth.append((len(manifest.tasks), sum(blobs.values())))


def _audit_part(registry: Registry, task: int, name: str, part: str, ref, model: ModelAudit) -> PartAudit:
    entry = PartAudit(task=task, name=name, part=part, codec=ref.codec, bytes=ref.size,
                      bits_per_weight=8 * ref.size / model.backbone_weights, vs_dense=model.dense_model_bytes / ref.size)
    value = registry.load(ref)
    if isinstance(value, PackedMasks) and value:
        stats = mask_stats(value)
        entry.mask = stats
        entry.vs_index16 = stats.index16_bytes / ref.size
        entry.vs_entropy = stats.entropy_bytes / ref.size
        entry.vs_zstd = stats.zstd_bytes / ref.size
        entry.vs_lzma = stats.lzma_bytes / ref.size
    return entry


def format_audit(result: ModelAudit) -> str:
    """A readable report: one row per task part, then the model totals."""
    rows = [
        f"model '{result.model}' generation {result.generation}: {result.tasks} task(s), "
        f"{result.backbone_weights:,} backbone weights (dense 32-bit copy: {result.dense_model_bytes:,} bytes)",
        "",
        "| task | part | codec | bytes | bits/weight | x dense | x 16-bit idx | x entropy | x zstd-19 | x lzma |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for p in result.parts:
        rows.append(f"| {p.task} ({p.name}) | {p.part} | {p.codec} | {p.bytes:,} | {p.bits_per_weight:.3f} | "
                    f"{p.vs_dense:.1f} | {fmt(p.vs_index16)} | {fmt(p.vs_entropy)} | {fmt(p.vs_zstd)} | {fmt(p.vs_lzma)} |")
    totals = result.to_dict()
    rows += [
        "",
        f"shared (backbone versions, shared parts): {result.shared_bytes:,} bytes = {totals['shared_bytes_per_task']:,.0f} per task",
        f"training state (kept for later tasks, never served): {result.state_bytes:,} bytes",
        f"registry for this model: {result.registry_bytes:,} bytes; one dense model per task would take "
        f"{totals['dense_per_task_bytes']:,} ({totals['compression_vs_dense_per_task']:.1f}x the registry's bytes)",
        f"with every earlier generation's blobs (what the registry keeps, `registry gc` too): "
        f"{result.history_bytes:,} bytes" + (f", without generation(s) {', '.join(map(str, result.unreadable))}, which "
                                             "cannot be read (`maskbank registry verify` says why)" if result.unreadable else ""),
        "(x ...: the reference's bytes divided by the stored bytes; above 1 means the registry stores less)",
    ]
    return "\n".join(rows)


def plot_audit(result: ModelAudit, path: str) -> None:
    """Bytes per task, and the registry's size after each generation against one dense model per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    per_task = result.task_bytes
    tasks, stored = zip(*result.growth)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(sorted({p.task for p in result.parts}), per_task)
    left.set(title="bytes per task (own parts)", xlabel="task id", ylabel="bytes")
    right.plot(tasks, stored, marker="o", label="maskbank registry (every blob of the generations so far)")
    right.plot(tasks, [result.dense_model_bytes * n for n in tasks], marker="s", label="one dense 32-bit model per task")
    right.set(title=f"cumulative size of '{result.model}'", xlabel="tasks", ylabel="bytes", yscale="log")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path)
