"""The decoder-only Transformer, in one file.

Every family (GPT-2, Llama, SmolLM2, Qwen2, Mistral) is this one module tree, switched by ``Config`` fields.
Shapes in comments use: B batch, T new tokens this call, S all tokens attended to (cache + new), C n_embd,
H query heads, K key/value heads, D head_dim, V vocab.

Batches of prompts with different lengths are left-padded; ``attention_mask`` (B, S) marks real tokens, and
positions are counted over real tokens only, so a padded prompt computes exactly what it computes alone.
A ``SlotKVCache`` instead gives every row its own length and position, for continuous batching.

Why one module: as nanoGPT's ``model.py``, the network reads top to bottom in one file, attention next to the
caches it writes and the one-token decode step next to the forward it shortcuts; splitting them would send a
reader across files to follow one tensor's shape.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge import cpu_kernel
from lmforge.config import Config

_INITIALISERS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "zeros_",
    "ones_",
)


@contextlib.contextmanager
def shell_device() -> Iterator[None]:
    """Build modules on the meta device, shapes only, without running their initialisers.

    For networks whose weights are loaded next. On the meta device torch runs ``nn.init``'s initialisers through
    its Python reference implementations, and the first one imports ``torch._dynamo`` (about 30 MiB resident in
    a process that only decodes, measured); like transformers' ``no_init_weights``, the initialisers are no-ops
    while the block runs (module-wide: shells are built one at a time).
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


IGNORE_INDEX = -100  # targets with this value add nothing to the loss (padding, masked prompts)


def loss_terms(targets: torch.Tensor) -> int:
    """How many targets a cross-entropy that skips IGNORE_INDEX averages over."""
    return int((targets != IGNORE_INDEX).sum())


def perplexity_from_loss(loss: float) -> float:
    """exp(mean cross-entropy in nats): the perplexity every report shows (capped so a diverged run reads inf-free)."""
    return math.exp(min(loss, 50.0))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # Normalise in fp32 under bf16/fp16 (as transformers does): the mean of squares needs the precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (RoPE), in Hugging Face's rotate-half layout.

    The tables hold each angle once, (block_size, D/2): the rotate-half layout repeats them in the second half
    of the head dimension, which ``forward`` does for the positions it reads (half the memory: 2 MiB for
    SmolLM2's 8,192 positions).

    On the meta device (``shell_device``) only their shapes: computing them there would run torch's reference
    implementations (and import torch._dynamo); the loader builds the real tables, which no file holds.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        if torch.empty(0).device.type == "meta":
            shape = (config.block_size, config.head_dim // 2)
            self.register_buffer("cos", torch.empty(shape), persistent=False)
            self.register_buffer("sin", torch.empty(shape), persistent=False)
            return
        inv_freq = rope_inverse_frequencies(config)  # (D/2,)
        positions = torch.arange(config.block_size, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (block_size, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, D), broadcast over heads
        cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)  # (B, 1, T, D/2)
        return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, sin], dim=-1).to(dtype)


def rope_inverse_frequencies(config: Config) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    in_band = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return torch.where(in_band, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate pairs (i, i + D/2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` tokens: each (B, K, max_len, D).

    ``length`` counts the positions filled so far; a forward pass appends its T new positions at
    ``[length, length + T)`` and the model advances ``length`` once all layers have written.
    """

    def __init__(
        self, config: Config, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0

    def reserve(self, length: int) -> None:
        """Check that ``length`` positions fit (a plain cache is sized once, for the whole generation)."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the KV cache of {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, K, T, D) -> all keys/values so far: (B, K, S, D)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Called once all layers have written this forward pass's tokens."""
        self.length += new_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (in that order), e.g. to drop finished sequences."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class StaticKVCache(KVCache):
    """A cache for the compiled decode step: every shape is fixed, and its state lives in tensors.

    The prompt is prefilled through the plain ``KVCache`` interface (``length`` counts columns). After
    ``start_decoding``, each ``Transformer.decode_step`` writes one token per row at that row's ``column`` and
    attends over all ``max_len`` columns, masking those not written (and each row's left padding): the step
    has the same shapes at every position, so ``torch.compile`` captures it once. The column dimension is
    marked dynamic, so a cache of another length reuses the compiled step (one graph per batch size). Rows
    whose ``live`` is 0 (a ``SlotKVCache``'s free slots) compute an ignored token and stay where they are.
    The attention over unwritten columns is the price, and it is small next to the weights a step reads
    while the cache is sized to the requests.
    """

    def __init__(
        self,
        config: Config,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        compiled: bool = False,
    ) -> None:
        super().__init__(config, batch_size, max_len, device, dtype)
        self.compiled = (
            compiled  # for a compiled step: mark the columns dynamic (which imports torch._dynamo)
        )
        self.key_ok = torch.zeros(
            batch_size, max_len, dtype=torch.bool, device=device
        )  # (B, L) written, real
        self.column = torch.zeros(
            batch_size, dtype=torch.long, device=device
        )  # (B,) where each row writes next
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1) its position
        self.live = torch.ones(batch_size, dtype=torch.long, device=device)  # (B,) 1: the row advances
        self.decoding = False  # False: prefill through KVCache.update; True: decode steps (step_update)
        self._mark_columns_dynamic()

    def _mark_columns_dynamic(self) -> None:
        """Tell torch.compile that the column dimension varies, so a new cache length is no new graph."""
        if self.compiled and self.max_len > 1:  # sizes 0 and 1 are always specialised
            for t in self.keys + self.values:
                torch._dynamo.mark_dynamic(t, 2)
            torch._dynamo.mark_dynamic(self.key_ok, 1)

    def start_decoding(self, attention_mask: torch.Tensor | None) -> None:
        """After the prompt's prefill: ``attention_mask`` (B, length) marks its real tokens (None: all real)."""
        n = self.length
        self.key_ok.zero_()
        if attention_mask is None:
            self.key_ok[:, :n] = True
            self.positions.fill_(n)
        else:
            self.key_ok[:, :n] = attention_mask.bool()
            self.positions.copy_(attention_mask.sum(-1, keepdim=True))
        self.column.fill_(n)
        self.live.fill_(1)
        self.decoding = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step_update(layer, k, v) if self.decoding else super().update(layer, k, v)

    def step_positions_and_mask(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, 1) and attention mask (B, 1, 1, L) of one decode step (in-place, no new shapes)."""
        rows = torch.arange(self.column.shape[0], device=self.column.device)
        self.key_ok[rows, self.column] = True
        allowed = self.key_ok
        if window is not None:
            # Columns and positions differ by each row's left padding, a constant: distances agree.
            columns = torch.arange(self.key_ok.shape[1], device=rows.device)
            allowed = allowed & (self.column[:, None] - columns < window)
        return self.positions, allowed[:, None, None, :]

    def step_update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, K, 1, D), each row's written at its own column -> all columns (B, K, L, D). Indexed
        # assignment (index_put_), not scatter_: inductor writes it in place, where a scatter copied the cache.
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[layer][rows, :, self.column] = k[:, :, 0]
        self.values[layer][rows, :, self.column] = v[:, :, 0]
        return self.keys[layer], self.values[layer]

    def step_advance(self) -> None:
        self.column.add_(self.live)
        self.positions.add_(self.live[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        """Rows ``index`` in that order, repeats allowed (beam search copies a row per beam, then follows
        the beams kept): the keys and values and each row's columns, position and mask go together."""
        super().reorder(index)
        self.key_ok, self.column = self.key_ok.index_select(0, index), self.column.index_select(0, index)
        self.positions, self.live = self.positions.index_select(0, index), self.live.index_select(0, index)
        self._mark_columns_dynamic()


class SlotKVCache(StaticKVCache):
    """The slots of continuous batching: every row an independent sequence, at its own column and position.

    A sequence joins with ``add`` (its prompt's keys and values copied from the cache it was prefilled in,
    unpadded) and leaves with ``remove``; a free slot is an idle row (``live`` 0) whose output is ignored.
    ``decode_step`` runs it exactly as a ``StaticKVCache``, so the same compiled step serves both, and a row
    computes what it computes alone. ``resize`` copies the cache into another shape (more or fewer slots,
    more or fewer columns), moving occupied slots down when slots shrink: callers keep the shapes in a few
    buckets, so the compiled step sees a few batch sizes (the columns are dynamic to it anyway).
    """

    def __init__(
        self,
        config: Config,
        slots: int,
        columns: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        compiled: bool = False,
    ) -> None:
        super().__init__(config, slots, columns, device, dtype, compiled=compiled)
        self.limit = config.block_size
        self.live.zero_()
        self.decoding = True
        self.used = [False] * slots

    @property
    def slots(self) -> int:
        return len(self.used)

    @property
    def rows(self) -> int:
        """Occupied slots."""
        return sum(self.used)

    def lengths(self) -> dict[int, int]:
        """Tokens held by each occupied slot."""
        columns = self.column.tolist()
        return {slot: columns[slot] for slot in range(self.slots) if self.used[slot]}

    def add(self, source: KVCache, row: int) -> int:
        """Copy row ``row`` of a cache a prompt was prefilled in (unpadded) into a free slot; return the slot."""
        n = source.length
        if all(self.used):
            raise ValueError(f"all {self.slots} slots of the cache are taken")
        if n >= self.max_len:
            raise ValueError(f"a sequence of {n} tokens needs more than the cache's {self.max_len} columns")
        slot = self.used.index(False)
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values, strict=True):
            mine[slot, :, :n] = theirs[row, :, :n]
        self.key_ok[slot] = False
        self.key_ok[slot, :n] = True
        self.column[slot] = n
        self.positions[slot] = n
        self.live[slot] = 1
        self.used[slot] = True
        return slot

    def remove(self, slot: int) -> None:
        """Free ``slot``: it becomes an idle row (its columns are simply overwritten by the next sequence)."""
        self.used[slot] = False
        self.live[slot] = 0
        self.column[slot] = 0
        self.positions[slot] = 0
        self.key_ok[slot] = False

    def resize(self, slots: int, columns: int) -> dict[int, int]:
        """Copy into (``slots``, ``columns``); return ``{old: new}`` for the occupied slots that moved.

        Occupied slots below ``slots`` keep their index; those above move into the lowest free ones.
        """
        lengths = self.lengths()
        if len(lengths) > slots or max(lengths.values(), default=0) >= columns:
            raise ValueError(
                f"{len(lengths)} sequences of up to {max(lengths.values())} tokens do not fit "
                f"{slots} slots of {columns} columns"
            )
        if columns > self.limit:
            raise ValueError(f"{columns} columns exceed the context length {self.limit}")
        free = iter(s for s in range(slots) if s >= self.slots or not self.used[s])
        moves = {old: next(free) for old in lengths if old >= slots}
        kept = [old for old in lengths if old < slots]
        source = torch.tensor(kept + list(moves), dtype=torch.long, device=self.column.device)
        target = torch.tensor(kept + list(moves.values()), dtype=torch.long, device=self.column.device)
        width = min(columns, self.max_len)

        def cache_rows(old: torch.Tensor) -> torch.Tensor:  # (B, K, L, D) -> (slots, K, columns, D)
            new = old.new_zeros(slots, old.shape[1], columns, old.shape[3])
            new[target, :, :width] = old[source, :, :width]
            return new

        def rows(old: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (slots, ...)
            new = old.new_zeros(slots, *old.shape[1:])
            new[target] = old[source]
            return new

        self.keys = [cache_rows(t) for t in self.keys]
        self.values = [cache_rows(t) for t in self.values]
        key_ok = self.key_ok.new_zeros(slots, columns)
        key_ok[target, :width] = self.key_ok[source, :width]
        self.key_ok = key_ok
        self.column, self.positions, self.live = rows(self.column), rows(self.positions), rows(self.live)
        used = [False] * slots
        for slot in target.tolist():
            used[slot] = True
        self.used = used
        self.max_len = columns
        self._mark_columns_dynamic()
        return moves


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One new token per row: q (B, H, 1, D), k/v (B, K, S, D), mask (B, 1, 1, S) -> (B, 1, H * D).

    The same softmax(q k^T / sqrt(D)) v as SDPA, as plain reductions that torch.compile fuses: for one query,
    SDPA's flash kernel costs ~110 us a layer on a 2-core CPU, these ~50 us (a third of the attention time).
    Query heads are grouped over their key/value head (GQA) instead of repeating keys. Float32 on a CPU runs
    ``cpu_kernel.decode_attention`` instead: the same arithmetic, reading only the columns the mask allows.
    """
    B, H, _, D = q.shape
    if cpu_kernel.runs_decode_attention(q):
        return cpu_kernel.decode_attention(q.view(B, H, D), k, v, mask[:, 0, 0].expand(B, -1)).view(
            B, 1, H * D
        )
    K = k.shape[1]
    qg = q.view(B, K, H // K, 1, D)  # (B, K, G, 1, D)
    scores = (qg * k[:, :, None]).sum(-1) * D**-0.5  # (B, K, G, S)
    scores = scores.masked_fill(~mask[:, :, 0, None], float("-inf")).softmax(
        -1
    )  # mask (B, 1, 1, S) -> (B, 1, 1, S)
    y = (scores[..., None] * v[:, :, None]).sum(-2)  # (B, K, G, D)
    return y.reshape(B, 1, H * D)


class _AttentionRecords(threading.local):
    """Per thread, the weights ``recording_attention`` collects (None: not recording). Per thread because a
    server explains a text in a task thread while its scheduler decodes on the same model: a flag on the
    shared modules would make the scheduler's steps record, and one explanation end another's recording."""

    weights: dict[Attention, torch.Tensor] | None = None


_RECORDS = _AttentionRecords()


@contextlib.contextmanager
def recording_attention() -> Iterator[dict[Attention, torch.Tensor]]:
    """Within the block, forwards run in this thread record every self-attention layer's weights (B, H, T, S)
    in the dict yielded, by layer module, in the order the layers ran."""
    records: dict[Attention, torch.Tensor] = {}
    outer, _RECORDS.weights = _RECORDS.weights, records
    try:
        yield records
    finally:
        _RECORDS.weights = outer


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention through SDPA, or ``single_query_attention`` for a decode step.

    Inside ``recording_attention`` (the opt-in return path of ``lmforge.explain``), a forward in that thread
    computes softmax(q k^T / sqrt(D)) explicitly and records it (B, H, T, S); SDPA does not hand its weights
    out. Elsewhere, and in every other thread, the forward is the unchanged fused one.
    """

    joined_qkv = None  # a packed model's q, k and v layers joined (``quant.join_projections``)

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.scale = config.attention_scale  # None: SDPA's 1 / sqrt(D)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, D)
        records = None if torch.compiler.is_compiling() else _RECORDS.weights  # a compiled step never records
        if records is not None:
            y, records[self] = self._attention_keeping_weights(q, k, v, mask)
            return self.o_proj(y)
        # A decode step; a float mask (an additive bias: T5's positions) and a custom scale take SDPA's path.
        if (
            T == 1
            and mask is not None
            and mask.dtype == torch.bool
            and self.scale is None
            and not self.training
        ):
            return self.o_proj(single_query_attention(q, k, v, mask))
        # A query with no past (fresh prompt, no padding) can use the fused causal kernel.
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
            scale=self.scale,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)  # (B, T, C)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k and v of x: one kernel call when a packed model joined the three (``quant.JoinedLinear``)."""
        joined = self.joined_qkv
        if joined is not None and joined.serves(self.q_proj, self.k_proj, self.v_proj):
            return joined(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _attention_keeping_weights(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same attention written out (no dropout: explanations run in eval): (B, T, H*D) and its weights."""
        B, H, T, D = q.shape
        S = k.shape[2]
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
        scale = D**-0.5 if self.scale is None else self.scale  # T5 scales nothing (attention_scale 1.0)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
        if mask is None:  # no past (SDPA's is_causal) or one query that sees every key
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:  # an additive bias, as SDPA takes it (T5's relative positions)
            scores = scores + mask
        weights = scores.float().softmax(-1).to(q.dtype)
        y = weights @ v  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D), weights


class MLP(nn.Module):
    """GPT-2: down(act(up(x))). Llama family (gated): down(act(gate(x)) * up(x))."""

    joined_gate_up = None  # a packed model's gate and up layers joined (``quant.join_projections``)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = (
            nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias) if config.gated_mlp else None
        )
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        joined = self.joined_gate_up
        if joined is not None and joined.serves(self.gate_proj, self.up_proj):
            gate, up = joined(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        if self.dropout.p == 0:  # skip the no-op module calls: they show in per-token decode time
            x = x + self.attn(self.attn_norm(x), rope, mask, cache)
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Network(nn.Module):
    """What every lmforge network (this decoder, ``encoder.Encoder``) answers: size, device and dtype."""

    wte: nn.Embedding
    compile_decode = False  # generate.py decodes with a torch.compile'd step when True (set by the loader)

    def num_parameters(self) -> int:
        """Float parameters, plus the weights packed layers hold as integers (``packed_parameters``)."""
        packed = sum(getattr(m, "packed_parameters", 0) for m in self.modules())
        return sum(p.numel() for p in self.parameters()) + packed

    @property
    def device(self) -> torch.device:
        return self._float_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        """The type activations flow in: that of the float parameters (packed layers hold integers)."""
        return self._float_parameter().dtype

    def _float_parameter(self) -> torch.Tensor:
        return next(p for p in self.parameters() if p.is_floating_point())

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class Transformer(Network):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.rope = RotaryEmbedding(config) if config.position == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Classification / regression head on the last real token (transformers names it "score" too).
        self.score = nn.Linear(config.n_embd, len(config.labels), bias=False) if config.labels else None
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory
        if self.wte.weight.device.type != "meta":  # meta-device models are shells that loaders fill in
            self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream n_layer * 2 times.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.device, self.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        classify: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with ``last_logits_only``) and the loss.

        ``targets`` (B, T) are the ids each position should predict (already shifted; IGNORE_INDEX skips one).
        ``attention_mask`` (B, S) is 1 for real tokens and 0 for left padding, covering cached tokens too.
        ``classify=True``: the classification head's outputs (B, num_labels) instead (``classify``), no loss.
        Training calls it so, through its DDP or FSDP wrapper: they gather and synchronise parameters only
        around ``forward`` (a method called past them reads FSDP's shards, and DDP averages no gradient).
        """
        if classify:
            return self.classify(idx, attention_mask), None
        x = self.hidden_states(idx, attention_mask=attention_mask, cache=cache)  # (B, T, C)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def classify(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T), left-padded -> head outputs (B, num_labels) read at the last position (a real token), or
        on the mean of the real tokens' states with ``config.head_pooling == "mean"``."""
        if self.score is None:
            raise ValueError("this model has no classification head (its config has no labels)")
        x = self.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        if self.config.head_pooling == "last":
            return self.score(x[:, -1])  # (B, L)
        if attention_mask is None:
            return self.score(x.mean(1))
        real = attention_mask[:, -x.shape[1] :, None].to(x.dtype)  # (B, T, 1): pads weigh nothing
        return self.score((x * real).sum(1) / real.sum(1).clamp(min=1))

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, C); what task heads and embeddings build on."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if S > self.config.block_size:
            raise ValueError(f"sequence of {S} tokens exceeds the context length {self.config.block_size}")
        if cache is not None:
            cache.reserve(S)
        positions, mask = self._positions_and_mask(B, T, past, attention_mask, idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self._blocks(x, positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        return x

    def decode_step(self, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """idx (B, 1), one new token per row -> next-token logits (B, V), through a ``StaticKVCache``.

        Fixed shapes and no Python-side state change: this is what ``torch.compile`` captures for decoding, for
        ``generate_tokens`` (a ``StaticKVCache``) and the server's scheduler (a ``SlotKVCache``) alike. The
        caller checks that every live row has room (its column < ``cache.max_len``) before each step.
        """
        positions, mask = cache.step_positions_and_mask(self.config.sliding_window)
        x = self.wte(idx)  # (B, 1, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self._blocks(x, positions, mask, cache)
        cache.step_advance()
        return self.lm_head(x)[:, -1]  # (B, V)

    def _blocks(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        """Embedded tokens x (B, T, C) at ``positions`` (B, T) -> final-norm hidden states (B, T, C)."""
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        x = self.drop(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        return self.norm(x)

    def _positions_and_mask(
        self, B: int, T: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        S = past + T
        window = self.config.sliding_window
        needs_window = window is not None and S > window
        if attention_mask is None:
            positions = torch.arange(past, S, device=device).expand(B, T)  # (B, T)
            if (past == 0 or T == 1) and not needs_window:
                return positions, None  # plain causal attention: SDPA's is_causal, or one query sees all
            key_ok = torch.ones(B, S, dtype=torch.bool, device=device)
            key_positions = torch.arange(S, device=device).expand(B, S)  # (B, S)
        else:
            key_ok = attention_mask.bool()  # (B, S)
            # Count positions over real tokens only, so padding does not shift them: left padding, or the columns
            # between a row's cached and new tokens when rows of different lengths prefill together (prefill_rows).
            key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            positions = key_positions[:, past:]  # (B, T)
        query_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None]  # (1, T, S) causal
        if needs_window:  # a window over positions, not columns (they differ where padding sits between)
            allowed = allowed & (positions[:, :, None] - key_positions[:, None, :] < window)  # (B, T, S)
        mask = allowed & key_ok[:, None, :]  # (B, T, S)
        # A padding query would see no key at all, and SDPA returns NaN for that row; let it see itself.
        mask = mask | (key_pos == query_pos)[None]
        return positions, mask.unsqueeze(1)  # (B, 1, T, S)
