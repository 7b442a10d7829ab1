"""The Transformer against transformers' implementations of GPT-2, Llama and Qwen2 (fp32, random weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lmforge import Config, Transformer, cpu_kernel
from lmforge.model import IGNORE_INDEX, single_query_attention

from .conftest import tiny_llm


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama", "tiny-qwen2"])
def pair(request, tiny_tokenizer, tmp_path_factory):
    """(lmforge LLM, transformers model) with the same random weights, via our model folder."""
    llm = tiny_llm(request.param, tiny_tokenizer)
    folder = llm.save(tmp_path_factory.mktemp(request.param) / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return llm, hf


def test_logits_match_transformers(pair):
    llm, hf = pair
    torch.manual_seed(1)
    ids = torch.randint(0, llm.config.vocab_size, (3, 40))
    with torch.no_grad():
        ours, _ = llm.model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_matches_transformers(pair):
    llm, hf = pair
    ids = torch.randint(0, llm.config.vocab_size, (2, 33))
    with torch.no_grad():
        _, ours = llm.model(ids[:, :-1], targets=ids[:, 1:])
        theirs = hf(ids, labels=ids).loss
    assert abs(ours.item() - theirs.item()) <= 1e-5


def test_padded_batch_matches_transformers(pair):
    llm, hf = pair
    ids = torch.randint(0, llm.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, _ = llm.model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_kv_cache_equals_full_forward(pair):
    llm, _ = pair
    model = llm.model
    ids = torch.randint(0, llm.config.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(2, 20)
        first, _ = model(ids[:, :8], cache=cache)
        steps = [model(ids[:, t : t + 1], cache=cache)[0] for t in range(8, 20)]
    incremental = torch.cat([first, *steps], dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "columns", "dim"),
    [(1, 9, 3, 256, 64), (3, 8, 2, 37, 128), (2, 4, 4, 5, 32), (2, 16, 2, 70, 128), (2, 6, 2, 40, 24)],
    ids=["smollm2", "gqa-4", "mha", "gqa-8", "head-size-24"],  # the last: the plain loop, not the vector path
)
def test_decode_attention_matches_sdpa(batch, heads, kv_heads, columns, dim):
    """A decode step's attention on a CPU (``cpu_kernel.decode_attention``) computes SDPA's softmax(q k^T) v to
    float32 rounding: over masks with holes (padding, unwritten columns, a window), a slice of a cache's
    columns, one mask row for the whole batch, and compiled; a row that may see no column gets NaN, as SDPA's."""
    assert cpu_kernel.available()  # x86 with AVX2 and g++: every machine CI runs on
    g = torch.Generator().manual_seed(columns)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, columns + 7, dim, generator=g) for _ in range(2))
    k, v = k[:, :, :columns], v[:, :, :columns]  # a cache's first columns: rows of D apart, not contiguous
    mask = torch.rand(batch, 1, 1, columns, generator=g) > 0.4
    mask[..., -1] = True

    def sdpa(mask: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
        )  # (B, H, 1, D)
        return y.transpose(1, 2).reshape(batch, 1, heads * dim)

    compiled = torch.compile(single_query_attention, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=32):  # a graph for each case's shapes and masks
        for m in (mask, mask[:1].expand(batch, -1, -1, -1)):
            for attend in (single_query_attention, compiled):
                assert (attend(q, k, v, m).double() - sdpa(m)).abs().max().item() <= 1e-6
    blind = mask.clone()
    blind[0] = False
    out = single_query_attention(q, k, v, blind)
    assert out[0].isnan().all() and not out[1:].isnan().any()
    # keys laid out as a projection's (B, S, K, D) transposed, not a cache's, and D values not contiguous
    kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert torch.equal(single_query_attention(q, kt, vt, mask), single_query_attention(q, k, v, mask))
    kd, vd = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (k, v))
    assert torch.equal(single_query_attention(q, kd, vd, mask), single_query_attention(q, k, v, mask))
    # one column (a first decode step): a size-1 dimension's stride can be anything, and is read, not assumed
    k1, v1 = (t[:, :, :1].transpose(2, 3).contiguous().transpose(2, 3) for t in (k, v))
    m1 = torch.ones(batch, 1, 1, 1, dtype=torch.bool).transpose(0, 3).contiguous().transpose(0, 3)
    one = F.scaled_dot_product_attention(q, k1, v1, attn_mask=m1, enable_gqa=True)
    assert (
        single_query_attention(q, k1, v1, m1) - one.transpose(1, 2).reshape(batch, 1, -1)
    ).abs().max() <= 1e-6
    # the plain ops it replaces on a CPU (and runs on other devices) agree
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernel, "_loaded", False)
        assert (single_query_attention(q, k, v, mask).double() - sdpa(mask)).abs().max().item() <= 1e-5


AVX2_ATTENTION_CHECK = """
import sys, torch, torch.nn.functional as F
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for B, H, K, L, D in [(1, 9, 3, 70, 64), (8, 9, 3, 40, 64), (3, 8, 2, 37, 32), (2, 4, 4, 9, 16), (2, 8, 2, 20, 128),
                      (2, 6, 2, 40, 24)]:
    q = torch.randn(B, H, D, generator=g)
    k, v = (torch.randn(B, K, L, D, generator=g) for _ in range(2))
    allowed = torch.rand(B, L, generator=g) > 0.4
    allowed[:, -1] = True
    y = torch.ops.lmforge.decode_attention(q, k, v, allowed).double()
    ref = F.scaled_dot_product_attention(q[:, :, None].double(), k.double(), v.double(),
                                         attn_mask=allowed[:, None, None], enable_gqa=True)
    error = (y - ref[:, :, 0].reshape(B, -1)).abs().max().item()
    assert error <= 1e-6, (B, H, K, L, D, error)
print("ok")
"""


def test_decode_attention_built_for_avx2_matches_sdpa(tmp_path):
    """The kernel as a CPU without AVX-512 builds it (8-float vectors: head sizes 16, 32 and 64 take the vector
    path, 24 and 128 the plain loop) computes SDPA's attention too: built here without the AVX-512 flags and run
    in a subprocess (the library registers the same op as the one this process loaded)."""
    import subprocess
    import sys

    target = tmp_path / "decode_attention_avx2.so"
    source = next(s for s in cpu_kernel.SOURCES if s.name == "decode_attention.cpp")
    cpu_kernel.compile_library([source], cpu_kernel.FLAGS, target)
    run = subprocess.run(
        [sys.executable, "-c", AVX2_ATTENTION_CHECK, str(target)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_ignore_index_skips_positions(tiny_tokenizer):
    model = Transformer(Config.from_name("tiny-llama"))
    ids = torch.randint(0, 512, (1, 10))
    targets = ids.clone()
    targets[0, :5] = IGNORE_INDEX
    logits, loss = model(ids, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], ids[0, 5:])
    assert torch.allclose(loss, expected)


def test_config_hf_round_trip():
    for name in Config.presets():
        config = Config.from_name(name)
        back = Config.from_hf(config.to_hf(), name=name)
        assert back == config, name


def test_parameter_count_formula_matches_model():
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "baby-gpt"]:
        config = Config.from_name(name)
        assert Transformer(config).num_parameters() == config.num_parameters(), name


def test_smollm2_preset_parameter_count():
    assert 134e6 < Config.from_name("smollm2-135m").num_parameters() < 136e6
