"""Attention explanations: the weights against transformers' on SmolLM2, and the normal path's speed, before/after.

    python benchmarks/explain.py                 # the bundled SmolLM2, one thread
    python benchmarks/explain.py --rounds 40

1. Parity: ``LLM.explain_attention`` (the opt-in ``record_weights`` path of ``model.Attention``) against
   transformers' ``output_attentions=True`` with ``attn_implementation="eager"`` on the same GGUF (its own
   loader, dequantized to fp32), English and Chinese text: the largest absolute difference of any weight.
2. Speed of the normal path: ``model.Attention.forward`` as it is now (one ``record_weights`` check added)
   against the forward before explanations existed (copied below verbatim from the commit before), swapped
   in and out of the same model in alternating rounds, so both see the same machine load: a 128-token
   prefill and a 1-token decode step over a 256-column cache (eager), median milliseconds.

Measured 2026-11-30 (2-core CPU shared with other jobs, load average ~14, so absolute times are inflated; the
alternating rounds keep the comparison fair), ``--rounds 10``:

    parity 'The quick br'...: (30, 9, 10, 10) weights, max |ours - transformers| = 0.00e+00
    parity '床前明月光，疑是地上霜。'...: (30, 9, 43, 43) weights, max |ours - transformers| = 0.00e+00
    | path   | 128-token prefill | 1-token decode step |
    | before | 2893.2            | 493.46              |
    | after  | 2870.4            | 486.16              |
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge import LLM
from lmforge.loading import bundled_model_path
from lmforge.model import Attention, KVCache, StaticKVCache, apply_rope, single_query_attention

TEXTS = ["The quick brown fox jumps over the lazy dog.", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]


def original_forward(
    self: Attention,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
    cache: KVCache | None,
) -> torch.Tensor:
    """``Attention.forward`` at commit 5844a12, before the ``record_weights`` path."""
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
        k, v = cache.update(self.layer, k, v)
    if T == 1 and mask is not None and not self.training:
        return self.o_proj(single_query_attention(q, k, v, mask))
    causal = mask is None and T > 1
    y = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal,
        dropout_p=self.dropout if self.training else 0.0,
        enable_gqa=self.n_kv_head != self.n_head,
    )
    y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
    return self.o_proj(y)


def parity(llm: LLM) -> None:
    from transformers import AutoModelForCausalLM

    path = bundled_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for text in TEXTS:
        maps = llm.explain_attention(text)
        with torch.no_grad():
            out = hf(torch.tensor([maps.token_ids]), output_attentions=True)
        theirs = torch.stack([a[0] for a in out.attentions])
        print(
            f"parity {text[:12]!r}...: {tuple(maps.weights.shape)} weights, "
            f"max |ours - transformers| = {(maps.weights - theirs).abs().max().item():.2e}"
        )


@torch.inference_mode()
def timings(llm: LLM, rounds: int) -> None:
    model = llm.model
    ids = torch.randint(0, llm.config.vocab_size, (1, 128))
    current = Attention.forward
    results: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for r in range(rounds):
        for name, forward in (("before", original_forward), ("after", current))[:: 1 if r % 2 else -1]:
            Attention.forward = forward
            try:
                start = time.perf_counter()
                model(ids)
                prefill = time.perf_counter() - start
                cache = StaticKVCache(llm.config, 1, 256, model.device, model.dtype)
                model(ids, cache=cache)
                cache.start_decoding(None)
                token = ids[:, -1:]
                start = time.perf_counter()
                model.decode_step(token, cache)
                step = time.perf_counter() - start
            finally:
                Attention.forward = current
            results[name].setdefault("prefill", []).append(prefill * 1000)
            results[name].setdefault("decode", []).append(step * 1000)
    print(f"\nnormal path, median of {rounds} alternating rounds (ms), {torch.get_num_threads()} thread(s):")
    print("| path | 128-token prefill | 1-token decode step |")
    print("|---|---|---|")
    for name in ("before", "after"):
        prefill, decode = (statistics.median(results[name][k]) for k in ("prefill", "decode"))
        print(f"| {name} | {prefill:.1f} | {decode:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating timing rounds (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM.load(dtype="float32", device="cpu", compile=False)
    parity(llm)
    timings(llm, args.rounds)


if __name__ == "__main__":
    main()
