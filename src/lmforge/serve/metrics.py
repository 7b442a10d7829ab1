"""Prometheus text exposition (format 0.0.4), written by hand: a histogram type and the page itself."""

from __future__ import annotations

import bisect
import threading

from lmforge.prefix_cache import PrefixCache

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last bucket is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines += [f"{self.name}_sum {total}", f"{self.name}_count {running}"]
        return lines


def sample(name: str, kind: str, help: str, value: float) -> list[str]:
    """One gauge or counter."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]


def prefix_cache_metrics(cache: PrefixCache | None) -> list[str]:
    """The prefix cache's counters (all 0 when it is off, so dashboards need no special case)."""
    stats = cache.stats if cache is not None else None
    budget = cache.budget_bytes if cache is not None else 0
    rows = [
        ("lookups_total", "counter", "Prompts looked up in the prefix cache.", "lookups"),
        ("hits_total", "counter", "Prompts that reused cached prefix blocks.", "hits"),
        ("hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache.", "hit_tokens"),
        ("evictions_total", "counter", "Prefix cache blocks evicted (least recently used).", "evictions"),
        ("bytes", "gauge", "Bytes of keys and values the prefix cache holds.", "bytes_in_use"),
        ("blocks", "gauge", "Blocks the prefix cache holds.", "blocks"),
    ]
    lines = []
    for name, kind, help, field in rows:
        value = getattr(stats, field) if stats is not None else 0
        lines += sample(f"lmforge_prefix_cache_{name}", kind, help, value)
    return lines + sample("lmforge_prefix_cache_budget_bytes", "gauge", "The prefix cache's budget.", budget)
