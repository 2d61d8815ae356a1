"""How long-running registry work (verify, gc, export) reports its progress: the caller passes a
wrapper for the loop of the work, such as a tqdm bar; the library itself prints nothing."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
Progress = Callable[[Iterable[T], int], Iterable[T]]  # (items, how many) -> the same items, reported


def no_progress(items: Iterable[T], total: int) -> Iterable[T]:
    """The default: the items as they are."""
    return items
