"""How much memory a server may give its weight cache: a share of what the process may use.

`--cache-bytes` takes bytes, or a share like "25%" (the default) of the memory the cached weights
live in: on the CPU, the container's limit (cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`,
the lowest of its cgroup's and their ancestors') where it is below the machine's memory, else the
machine's memory; on a GPU, the lower of the GPU's memory and that (the cache also holds the
gradient modes' mask matrix, which stays in host memory).
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
# Below this a nonzero bound holds no task's weights: a bare "25" is 25 bytes, a unit left off.
MIN_CACHE_BYTES = 64 << 10
_SHARE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*")


class Memory(NamedTuple):
    """Bytes a process may use in one place, and where that figure comes from (for logs)."""

    bytes: int
    source: str


class CacheBound(NamedTuple):
    """What a --cache-bytes setting came to: the bytes, and for a share, of what memory."""

    bytes: int
    share: str | None = None
    memory: Memory | None = None

    def describe(self) -> str:
        """For the server's log: "5.9 GiB (25% of 23.5 GiB, the machine's memory)"."""
        if self.memory is None:
            return _size(self.bytes)
        return f"{_size(self.bytes)} ({self.share} of {_size(self.memory.bytes)}, {self.memory.source})"


def cache_share(text: str) -> float:
    """The fraction a share like "25%" names, above 0 and at most 1; ValueError otherwise."""
    match = _SHARE.fullmatch(text)
    share = float(match.group(1)) / 100 if match else None
    if share is None or not 0 < share <= 1:
        raise ValueError(f"--cache-bytes '{text}' is not a share of memory above 0%, up to 100% (like 25%)")
    return share


def check_cache_setting(setting: object) -> None:
    """ValueError unless `setting` is a --cache-bytes a server can use: 0 (no cache), at least
    MIN_CACHE_BYTES bytes, or a share of memory like "25%"."""
    if isinstance(setting, str):
        if "%" not in setting:
            raise ValueError(f"--cache-bytes '{setting}': a text value is a share of memory like '25%'; give a size "
                             "as a number of bytes")
        cache_share(setting)
    elif isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"--cache-bytes must be a number of bytes or a share of memory like '25%', got {setting!r}")
    elif setting < 0:
        raise ValueError(f"--cache-bytes must be at least 0, got {setting}")
    elif 0 < setting < MIN_CACHE_BYTES:
        raise ValueError(f"--cache-bytes {setting} is {setting} bytes, too few to hold any task's weights: give a "
                         "unit (256MiB), a share of memory (25%), or 0 for no cache")


def resolve_cache_bytes(setting: int | str, device: torch.device) -> CacheBound:
    """The cache bound `setting` (bytes, or a share like "25%") means on `device`. ValueError where a
    share comes to a bound too small to hold anything."""
    if isinstance(setting, int):
        return CacheBound(setting)
    memory = cache_memory(device)
    bound = CacheBound(int(memory.bytes * cache_share(setting)), setting.strip(), memory)
    if bound.bytes < MIN_CACHE_BYTES:
        raise ValueError(f"--cache-bytes {setting.strip()} comes to {bound.bytes} bytes of {_size(memory.bytes)}: too "
                         "few to hold any task's weights; give a larger share or a size (256MiB)")
    return bound


def cache_memory(device: torch.device) -> Memory:
    """The memory a share of --cache-bytes is taken of on `device`: the host's (host_memory) on the
    CPU; on a GPU the lower of its memory and the host's, since the cache holds host tensors too."""
    host = host_memory()
    if device.type != "cuda":
        return host
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = Memory(torch.cuda.get_device_properties(index).total_memory, f"the memory of GPU cuda:{index}")
    if gpu.bytes <= host.bytes:
        return gpu
    return Memory(host.bytes, f"{host.source}, below the {_size(gpu.bytes)} of GPU cuda:{index}")


def host_memory(root: Path = Path("/"), physical: int | None = None) -> Memory:
    """What this process may use of the machine's memory: the lowest cgroup limit (v2 or v1) of its
    cgroup and their ancestors, and of the mount's root, when one is below the machine's memory,
    else that. `root` and `physical` stand in for the filesystem root and the machine's memory in tests."""
    if physical is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = [limit for path in _limit_files(root) if (limit := _read_limit(path)) is not None and limit < physical]
    if limits:
        return Memory(min(limits), "the container's memory limit (cgroup)")
    return Memory(physical, "the machine's memory")


def _limit_files(root: Path) -> list[Path]:
    """The memory limit files that may bound this process: for each cgroup hierarchy it is in
    (/proc/self/cgroup), the one of its cgroup and of each ancestor up to the mount's root (a
    container's own cgroup is that root where the path in /proc/self/cgroup is the host's)."""
    try:
        lines = (root / "proc/self/cgroup").read_text(errors="replace").splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy:controllers:path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2
            bases, name = [root / "sys/fs/cgroup"], "memory.max"
        elif "memory" in controllers.split(","):  # v1, mounted as memory/ or under the controllers' joint name
            bases = [root / "sys/fs/cgroup/memory", root / "sys/fs/cgroup" / controllers]
            name = "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        files += [base.joinpath(*parts[:depth], name) for base in bases for depth in range(len(parts) + 1)]
    return files


def _read_limit(path: Path) -> int | None:
    """A limit file's bytes; None where it is missing, unreadable or says "max" (none)."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):  # ValueError: not text
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def _size(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"
