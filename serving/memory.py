"""How much memory a server may give its weight cache: a share of what the process may use.

`--cache-bytes` takes bytes, or a share like "25%" (the default) of the memory the cached weights
live in: on the CPU, the container's limit (cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`)
where it is below the machine's memory, else the machine's memory; on a GPU, the GPU's memory.
Why a share, as the JVM sizes its default heap: the cache holds only what requests use, so a bound
sized to the machine costs nothing on few tasks, and on many it is what keeps them built (random
tasks of 1,000 at 0.84-0.86x the requests/s of one task with every task cached, against 0.76-0.77x
with the former fixed 256 MiB; python -m bench.serving --only task_mix).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

DEFAULT_CACHE_SHARE = "25%"
_SHARE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


class Memory(NamedTuple):
    """Bytes a process may use in one place, and where that figure comes from (for logs)."""

    bytes: int
    source: str


def cache_share(text: str) -> float:
    """The fraction a share like "25%" names, above 0 and at most 1; ValueError otherwise."""
    match = _SHARE.fullmatch(text)
    share = float(match.group(1)) / 100 if match else None
    if share is None or not 0 < share <= 1:
        raise ValueError(f"--cache-bytes '{text}' is neither a size in bytes (like 512MiB) nor a share of memory "
                         "above 0%, up to 100% (like 25%)")
    return share


def cache_bytes(setting: int | str, device: torch.device) -> tuple[int, str]:
    """The cache bound `setting` (bytes, or a share like "25%") means on `device`, and how it was
    reached, for the server's log: e.g. "6.0 GiB (25% of 24.0 GiB, the machine's memory)"."""
    if isinstance(setting, int):
        return setting, _size(setting)
    share = cache_share(setting)
    memory = gpu_memory(device) if device.type == "cuda" else host_memory()
    size = int(memory.bytes * share)
    return size, f"{_size(size)} ({setting.strip()} of {_size(memory.bytes)}, {memory.source})"


def host_memory(root: Path = Path("/"), physical: int | None = None) -> Memory:
    """What this process may use of the machine's memory: its cgroup's limit (v2 or v1, its own
    cgroup's or the mount's root, the lowest) when one is below the machine's memory, else that.
    `root` and `physical` stand in for the filesystem root and the machine's memory in tests."""
    if physical is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [limit for path in _limit_files(root) if (limit := _read_limit(path)) is not None and limit < physical]
    if limits:
        return Memory(min(limits), "the container's memory limit (cgroup)")
    return Memory(physical, "the machine's memory")


def gpu_memory(device: torch.device) -> Memory:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Memory(torch.cuda.get_device_properties(index).total_memory, f"the memory of GPU cuda:{index}")


def _limit_files(root: Path) -> list[Path]:
    """The memory limit files that may bound this process: for each cgroup hierarchy it is in
    (/proc/self/cgroup), the one at the mount's root (a container's own cgroup, where the path in
    /proc/self/cgroup is the host's) and the one at its path."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy:controllers:path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2
            base, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        files += [base / name, base / path.lstrip("/") / name]
    return files


def _read_limit(path: Path) -> int | None:
    """A limit file's bytes; None where it is missing, unreadable or says "max" (none)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _size(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"
