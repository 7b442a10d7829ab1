"""Prefix caching: prompts that start alike reuse the keys and values of their shared start.

A prompt is cut into blocks of ``block_size`` tokens; block i is named by a hash chained over blocks 0..i (its
own tokens and its parent's name), as vLLM's automatic prefix caching and llama.cpp's server name theirs, so one
name stands for the whole prefix up to the end of that block and two prompts share a block only when they share
everything before it. Only full blocks are kept, and never the block holding a prompt's last token: that token
is always computed, so its logits exist.

Each entry holds one block's keys and values for every layer, (2, n_layer, K, block_size, D), on the model's
device. Entries live in one LRU order bounded by ``budget_bytes``; an entry is touched deepest block first, so
a block is always more recent than its descendants and eviction takes leaves before the blocks they hang from
(an orphan would cost memory and never be found). A changed model (training, a merged adapter: any in-place
write to a weight bumps its version counter) empties the cache before the next lookup, so stale keys are
never reused.

``reuse`` fills the start of a fresh ``KVCache`` of a left-padded batch (one row, unpadded, in the server's
scheduler) and returns the column the prefill continues from; ``store`` keeps the full blocks once the prompt
is in. A batch continues from one column for every row: the smallest reach over the rows of padding plus cached
tokens (a row may take part of a block), so one row without a hit in a padded batch costs the others theirs
(the scheduler prefills each prompt alone, so it never does). A lock makes every call atomic: the server's
scheduler and its task threads share one cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lmforge.errors import LmforgeError
from lmforge.limits import DEFAULT_PREFIX_CACHE_MB, MiB, check_prefix_cache_mb
from lmforge.model import KVCache

DEFAULT_BLOCK_SIZE = 16  # tokens per cached block (vLLM's default): a hit is a multiple of it
MAX_BLOCK_SIZE = 4096


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made: lookups, those that hit, tokens reused, blocks evicted, bytes held."""

    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    bytes_in_use: int = 0
    blocks: int = 0


def block_names(tokens: Sequence[int], block_size: int, count: int) -> list[bytes]:
    """The chained names of the first ``count`` full blocks of ``tokens``."""
    names, parent = [], b""
    array = np.asarray(tokens[: count * block_size], dtype=np.int64)
    for i in range(count):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array[i * block_size : (i + 1) * block_size].tobytes())
        parent = digest.digest()
        names.append(parent)
    return names


# Parameters, buffers and submodules registered or replaced in any module of this process, counted by PyTorch's
# global registration hooks: while the count stands, a model holds the tensors it held when last listed.
_registrations = 0


def _count_registration(*_: object) -> None:
    global _registrations
    _registrations += 1


for _register in (
    register_module_parameter_registration_hook,
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
):
    _register(_count_registration)


class WeightsVersion:
    """``current()`` changes whenever one of the model's weights is written in place (its version counter) or
    replaced (its storage; a new parameter, buffer or submodule). Tensors made under ``torch.inference_mode`` keep
    no version counter: they cannot be written in place outside it.

    The tensors are listed again only after a registration anywhere in the process: listing them walks every
    module (1.8 ms for SmolLM2's 697 tensors, twice for each request a server prefills); a check reads each
    one's storage pointer and version counter (0.1 ms)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._listed_at = -1  # the registration count when the tensors were listed
        self._tensors: list[torch.Tensor] = []
        # those with a version counter (an inference tensor has none)
        self._versioned: list[torch.Tensor] = []

    def current(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self._listed_at != _registrations:
            self._listed_at = _registrations  # before listing: a registration meanwhile lists them again
            self._tensors = [*self.model.parameters(), *self.model.buffers()]
            self._versioned = [t for t in self._tensors if not t.is_inference()]
        return tuple(map(torch.Tensor.data_ptr, self._tensors)), tuple(t._version for t in self._versioned)


class PrefixCache:
    """Keys and values of prompt blocks of one model, by chained block hash, under a byte budget (LRU)."""

    def __init__(
        self, model: torch.nn.Module, budget_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise LmforgeError(
                f"prefix cache block size {block_size} is out of range", hint=f"use 1 to {MAX_BLOCK_SIZE}"
            )
        if budget_bytes < 0:
            raise LmforgeError(
                f"prefix cache budget of {budget_bytes} bytes is negative", hint="use 0 or more"
            )
        self.model = model
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._weights = WeightsVersion(model)
        self._version = self._weights.current()

    @classmethod
    def megabytes(
        cls,
        model: torch.nn.Module,
        megabytes: float = DEFAULT_PREFIX_CACHE_MB,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> PrefixCache | None:
        """A cache of ``megabytes`` MiB for ``model``; None when the budget is 0 (caching off)."""
        megabytes = check_prefix_cache_mb(megabytes)
        return cls(model, int(megabytes * MiB), block_size) if megabytes > 0 else None

    @property
    def bytes_in_use(self) -> int:
        return self.stats.bytes_in_use

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.stats.bytes_in_use = self.stats.blocks = 0

    def reuse(
        self,
        cache: KVCache,
        prompts: Sequence[Sequence[int]],
        width: int,
        heads: Sequence[int] | None = None,
    ) -> list[int]:
        """Copy cached blocks of ``prompts`` (left-padded to ``width`` columns) into the empty ``cache`` and set
        its length to the column prefill continues from; return each row's reused token count.

        ``heads`` (per row) limits the reuse to a row's first tokens, as if the row ended there (scoring needs
        the logits from there on); by default a row's last token is the one always computed."""
        with self._lock:
            self._check_model()
            found = []
            for i, prompt in enumerate(prompts):
                head = len(prompt) if heads is None else heads[i]
                usable = (head - 1) // self.block_size  # the head's last token is always computed
                names = block_names(prompt, self.block_size, usable)
                hit = 0
                while hit < len(names) and names[hit] in self._blocks:
                    hit += 1
                found.append(names[:hit])
                self.stats.lookups += 1
            # One column for the whole batch: each row's padding plus its cached tokens reaches at least there.
            start = min(
                width - len(p) + len(f) * self.block_size for p, f in zip(prompts, found, strict=True)
            )
            reused = []
            for row, (prompt, names) in enumerate(zip(prompts, found, strict=True)):
                pad = width - len(prompt)
                take = max(0, start - pad)  # tokens: may end inside a block, whose first ones are as good
                reused.append(take)
                blocks = names[: -(-take // self.block_size)]
                self._touch(blocks)
                if take == 0:
                    continue
                self.stats.hits += 1
                self.stats.hit_tokens += take
                kv = torch.cat([self._blocks[name] for name in blocks], dim=3)  # (2, L, K, n, D)
                for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
                    keys[row, :, pad:start] = kv[0, layer, :, :take]
                    values[row, :, pad:start] = kv[1, layer, :, :take]
            cache.length = start
            return reused

    def store(
        self,
        cache: KVCache,
        prompts: Sequence[Sequence[int]],
        width: int,
        heads: Sequence[int] | None = None,
    ) -> None:
        """Keep the full blocks of ``prompts`` (left-padded to ``width`` columns, prefilled into ``cache``);
        ``heads`` as in ``reuse``: only blocks that a later ``reuse`` of the same heads could take."""
        with self._lock:
            self._check_model()
            for row, prompt in enumerate(prompts):
                head = len(prompt) if heads is None else heads[row]
                count = (head - 1) // self.block_size
                names = block_names(prompt, self.block_size, count)
                pad = width - len(prompt)
                size = self._block_bytes(cache)
                # Room for the new blocks of this chain, evicting others; what does not fit is not kept.
                chain = set(names)
                kept = 0
                for i, name in enumerate(names):
                    if name not in self._blocks:
                        if not self._make_room(size, chain):
                            break
                        start = pad + i * self.block_size
                        self._blocks[name] = torch.stack(
                            [
                                torch.stack([k[row, :, start : start + self.block_size] for k in cache.keys]),
                                torch.stack(
                                    [v[row, :, start : start + self.block_size] for v in cache.values]
                                ),
                            ]
                        )
                        self.stats.bytes_in_use += size
                        self.stats.blocks += 1
                    kept = i + 1
                self._touch(names[:kept])

    # ------------------------------------------------------------------ under the lock
    def _check_model(self) -> None:
        version = self._weights.current()
        if version != self._version:
            self._blocks.clear()
            self.stats.bytes_in_use = self.stats.blocks = 0
            self._version = version

    def _touch(self, names: Sequence[bytes]) -> None:
        """Mark a chain used: deepest first, so each block ends more recent than the blocks below it."""
        for name in reversed(names):
            self._blocks.move_to_end(name)

    def _block_bytes(self, cache: KVCache) -> int:
        k = cache.keys[0]
        return 2 * len(cache.keys) * k.shape[1] * self.block_size * k.shape[3] * k.element_size()

    def _make_room(self, size: int, keep: set[bytes]) -> bool:
        """Evict least recently used blocks (not those in ``keep``) until ``size`` more bytes fit the budget."""
        if size > self.budget_bytes:
            return False
        victims = iter([name for name in self._blocks if name not in keep])
        while self.stats.bytes_in_use + size > self.budget_bytes:
            name = next(victims, None)
            if name is None:
                return False
            del self._blocks[name]
            self.stats.bytes_in_use -= size
            self.stats.blocks -= 1
            self.stats.evictions += 1
        return True
