"""The byte-bounded LRU cache, driven through its states."""

from serving.cache import LRUCache


def test_lru_evicts_least_recently_used_by_bytes():
    cache = LRUCache(capacity_bytes=10)
    cache.put("a", 1, 4)
    cache.put("b", 2, 4)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3, 4)  # 12 bytes > 10: evicts b
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (3, 1, 1, 2, 8)


def test_oversize_entries_are_returned_but_not_kept():
    cache = LRUCache(capacity_bytes=10)
    assert cache.get_or_create("big", lambda: ("value", 11)) == "value"
    assert cache.stats().entries == 0


def test_replacing_and_evicting_keep_the_byte_count():
    cache = LRUCache(capacity_bytes=100)
    cache.put("a", 1, 30)
    cache.put("a", 2, 50)
    assert cache.stats().bytes == 50 and cache.get("a") == 2
    assert cache.evict("a") and not cache.evict("a")
    assert cache.stats().bytes == 0


def test_get_or_create_builds_once():
    cache, calls = LRUCache(100), []
    for _ in range(3):
        cache.get_or_create("k", lambda: (calls.append(1) or "v", 1))
    assert len(calls) == 1 and cache.stats().hits == 2
