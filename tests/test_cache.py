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


def test_a_miss_is_admitted_while_it_fits_without_evicting():
    cache = LRUCache(capacity_bytes=10)
    cache.put("a", 1, 4)
    assert cache.get("b") is None and cache.admits("b", 6)
    assert cache.stats().rejections == 0


def test_a_full_cache_admits_only_what_is_used_more_often_than_its_victims():
    cache = LRUCache(capacity_bytes=10)
    cache.get_or_create("a", lambda: (1, 5))
    cache.get_or_create("b", lambda: (2, 5))
    assert cache.get_or_create("c", lambda: (3, 5)) == 3  # looked up once, like a: returned, not kept
    assert cache.stats().entries == 2 and cache.stats().rejections == 1 and cache.stats().evictions == 0
    assert cache.get_or_create("c", lambda: (3, 5)) == 3  # twice now, more than a (the LRU victim)
    assert cache.get("a") is None and cache.get("b") == 2 and cache.get("c") == 3
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions, stats.rejections) == (2, 10, 1, 1)


def test_a_miss_must_beat_every_entry_it_would_evict():
    cache = LRUCache(capacity_bytes=10)
    for key in ("a", "b"):
        cache.put(key, key, 5)
    for _ in range(3):
        cache.get("b")  # b: 3 lookups; a: none
    for _ in range(2):
        cache.get("c")
    assert not cache.admits("c", 10)  # would evict a (0 lookups) and b (3 lookups)
    assert cache.admits("c", 5)  # evicts only a
    assert not cache.admits("big", 11) and cache.stats().rejections == 2


def test_lookup_counts_age_so_a_new_favourite_gets_in():
    cache = LRUCache(capacity_bytes=4)
    cache.put("old", 1, 4)
    for _ in range(100):
        cache.get("old")
    cache.get("new")
    cache.get("new")
    assert not cache.admits("new", 4)  # 2 recent lookups against old's 64 (100, halved once)
    for i in range(720):  # ten windows of 8 * 1 + 64 lookups: old's count halves to nothing
        cache.get(f"other {i}")
    cache.get("new")
    assert cache.admits("new", 4)


def test_a_closed_view_reads_but_puts_nothing_and_other_views_are_untouched():
    cache = LRUCache(100)
    old, new = cache.view(), cache.view()
    old.put("a", "A", 10)
    old.close()
    old.put("b", "B", 10)
    assert old.get("a") == "A" and "b" not in cache
    assert not old.admits("c", 10) and cache.stats().rejections == 0  # not the admission policy's refusal
    assert old.get_or_create("c", lambda: ("C", 10)) == "C" and "c" not in cache  # built, returned, not kept
    new.put("b", "B", 10)
    assert new.get_or_create("c", lambda: ("C", 10)) == "C" and all(k in cache for k in "abc")
    assert cache.evict_where(lambda key: key in ("a", "b")) == (2, 20) and cache.stats().bytes == 10
    other = old.view()  # a view of a closed view is a fresh view of the cache, open
    other.put("d", "D", 10)
    assert "d" in cache
