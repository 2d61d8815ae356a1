"""Storage benchmark: bits per weight of SupSup supermasks the trainer actually produces.

Trains SupSup on permuted digits (MLP 64-512-512-10, 3 tasks per density, 30 epochs) at densities
0.05, 0.1, 0.3 and 0.5, loads each task's mask back from the registry, and reports bits per weight
(all masked layers together) of:

  (a) a dense 32-bit copy; (b) SupSup's 16-bit index lists (16 x density, as the paper counts);
  (c) the iid entropy H(d) at the masks' density; (d) zstd -19 and lzma (preset 9 | EXTREME) of the
  bitpacked bytes; the `bitmask/v1` and `entropy-mask/v1` blobs (whole blobs, container header
  included; the entropy-mask payload alone is shown too), and entropy-mask/v1 / min((c), (d)).

Decode time of entropy-mask/v1 against bitmask/v1 (through registry.codecs.decode, as serving
loads a task): per mask, warm-up, then A B A B ... repetitions; the median ratio with its min-max,
and the median absolute milliseconds of each. Runs with torch.set_num_threads(2).
Prints Markdown tables and writes the same numbers to bench/results/storage.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from registry import Registry
from registry.audit import mask_stats
from registry.codecs import decode, encode, encode_smallest
from registry.kinds import MASK_CODECS
from registry.mask_coding import CODEC
from trainer import train

from ._command import run_benchmark

DENSITIES = (0.05, 0.1, 0.3, 0.5)
TASKS = 3
ARCHITECTURE = {"arch": "mlp", "sizes": [64, 512, 512, 10]}
EPOCHS = 30
THREADS = 2
WARMUP, REPEATS = 2, 7
RESULTS = Path(__file__).parent / "results" / "storage.json"
COLUMNS = {  # key in the JSON -> column of the table
    "dense_fp32": "(a) dense fp32",
    "supsup_index16": "(b) SupSup 16-bit idx",
    "iid_entropy": "(c) H(d)",
    "zstd19": "(d) zstd -19",
    "lzma9e": "(d) lzma -9e",
    "bitmask_v1": "bitmask/v1",
    "entropy_mask_v1": "entropy-mask/v1",
    "entropy_mask_v1_payload": "(its payload)",
}

Masks = dict[str, torch.Tensor]


def train_masks(density: float) -> list[Masks]:
    """Train TASKS SupSup tasks at `density` in a throwaway registry; return their masks as stored."""
    settings = {"method": "supsup", "stream": "permuted-digits", "architecture": ARCHITECTURE}
    settings["method_config"] = {"density": density, "epochs": EPOCHS}
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        manifest = train(registry, "storage", TASKS, settings, log=lambda _: None)
        return [registry.load(task.parts["masks"]) for task in manifest.tasks]


def sizes_in_bits(masks: Masks) -> dict[str, float]:
    """Bits each representation spends on `masks` (all layers together); the references are the
    ones `maskbank registry audit` reports (registry.audit.mask_stats)."""
    stats = mask_stats(masks)
    entropy_blob = encode(CODEC, masks)
    return {
        "dense_fp32": 32.0 * stats.weights,
        "supsup_index16": 8.0 * stats.index16_bytes,
        "iid_entropy": 8.0 * stats.entropy_bytes,
        "zstd19": 8.0 * stats.zstd_bytes,
        "lzma9e": 8.0 * stats.lzma_bytes,
        "bitmask_v1": 8.0 * len(encode("bitmask/v1", masks)),
        "entropy_mask_v1": 8.0 * len(entropy_blob),
        "entropy_mask_v1_payload": 8.0 * (len(entropy_blob) - 8 - int.from_bytes(entropy_blob[:8], "little")),
    }


def decode_seconds(masks: Masks) -> dict[str, list[float]]:
    """Alternating timed decodes of both codecs' blobs of `masks`, after a warm-up."""
    blobs = {codec: encode(codec, masks) for codec in ("bitmask/v1", CODEC)}
    times: dict[str, list[float]] = {codec: [] for codec in blobs}
    for repetition in range(WARMUP + REPEATS):
        for codec, blob in blobs.items():
            began = time.perf_counter()
            decode(codec, blob)
            if repetition >= WARMUP:
                times[codec].append(time.perf_counter() - began)
    return times


def measure(density: float) -> dict:
    """Every number of one table row, from TASKS freshly trained masks."""
    all_masks = train_masks(density)
    weights = sum(m.numel() for m in all_masks[0].values())
    totals: dict[str, float] = {}
    for masks in all_masks:
        for name, bits in sizes_in_bits(masks).items():
            totals[name] = totals.get(name, 0.0) + bits
    per_weight = {name: bits / (weights * len(all_masks)) for name, bits in totals.items()}
    best_reference = min(per_weight["iid_entropy"], per_weight["zstd19"], per_weight["lzma9e"])
    timings = [decode_seconds(masks) for masks in all_masks]
    ratios = [e / b for t in timings for e, b in zip(t[CODEC], t["bitmask/v1"])]
    return {
        "density": density,
        "measured_density": sum(int(m.sum()) for masks in all_masks for m in masks.values()) / (weights * len(all_masks)),
        "bits_per_weight": per_weight,
        "entropy_mask_to_best_reference": per_weight["entropy_mask_v1"] / best_reference,
        "chosen_codecs": [encode_smallest(MASK_CODECS, masks)[0] for masks in all_masks],
        "decode": {
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "entropy_mask_ms_median": 1e3 * statistics.median(s for t in timings for s in t[CODEC]),
            "bitmask_ms_median": 1e3 * statistics.median(s for t in timings for s in t["bitmask/v1"]),
        },
    }


def storage_table(rows: list[dict]) -> str:
    titles = [*COLUMNS.values(), "entropy-mask / min((c), (d))", "chooser picks"]
    lines = ["| density | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for row in rows:
        codecs = row["chosen_codecs"]
        cells = [f"{row['density']:g}", *(f"{row['bits_per_weight'][key]:.4f}" for key in COLUMNS)]
        picks = ", ".join(f"{c} x{codecs.count(c)}" for c in sorted(set(codecs)))
        cells += [f"{row['entropy_mask_to_best_reference']:.3f}", picks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    lines = [
        "| density | decode entropy-mask/v1 / bitmask/v1 (median, min-max) | entropy-mask/v1 ms | bitmask/v1 ms |",
        "|---|---|---|---|",
    ]
    for row in rows:
        d = row["decode"]
        lines.append(
            f"| {row['density']:g} | {d['ratio_median']:.1f}x ({d['ratio_min']:.1f}-{d['ratio_max']:.1f}) "
            f"| {d['entropy_mask_ms_median']:.2f} | {d['bitmask_ms_median']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = [measure(density) for density in DENSITIES]
    print(f"SupSup masks, MLP {ARCHITECTURE['sizes']}, permuted digits, {TASKS} tasks per density, {EPOCHS} epochs; "
          f"bits per weight over all masked layers; torch.set_num_threads({THREADS})\n")
    print(storage_table(rows) + "\n")
    print(f"Decode time per task mask ({WARMUP} warm-up, then {REPEATS} alternating repetitions per mask, {TASKS} masks):\n")
    print(decode_table(rows) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setup = {"architecture": ARCHITECTURE, "tasks": TASKS, "epochs": EPOCHS, "threads": THREADS}
    setup |= {"warmup": WARMUP, "repeats": REPEATS}
    RESULTS.write_text(json.dumps({"benchmark": "storage", "setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_benchmark(main, __doc__)
