"""estimate and select: predicted peak memory against the peak RSS of the real workloads, ranking, errors.

The workloads run in their own processes (at the same time, to keep the suite quick), each reporting its own
peak RSS (VmHWM); speed is measured too but never asserted, as the machine is shared.
"""

from __future__ import annotations

import itertools
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scipy.stats import binomtest

import lmforge
from lmforge import LLM, Config, LmforgeError, Transformer
from lmforge.cli import main
from lmforge.formats.gguf import GGUFFile
from lmforge.loading import build_network
from lmforge.lora import LoRAConfig, inject_lora
from lmforge.recipes.finetune import choose_trainable
from lmforge.sizing import estimate, format_size, parse_size, runtime_baseline, select
from lmforge.sizing.memory import model_shell, saved_bytes, saved_per_token

from .conftest import TEST_DATA, one_intra_op_thread, tiny_llm

# A ~29M-parameter Llama with SmolLM2's 49k vocabulary: the model, not the runtime, dominates, and the logits
# and the embedding's gradient are as large as in real small models.
SMALL = dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=3, intermediate_size=1024, block_size=256)
TOLERANCE = 0.20
# The child's own peak: /proc's VmHWM. Not ru_maxrss: Linux folds the high-water mark of the memory a process
# had before exec into it, and a child spawned by vfork had its parent's (this test process, with torch loaded).
_PEAK = """
import json, re
status = open("/proc/self/status").read()
print(json.dumps({"peak": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024}))
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    tokenizer = GGUFFile(smollm2_gguf).tokenizer()
    torch.manual_seed(0)
    config = Config(vocab_size=49152, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **SMALL)
    return LLM(Transformer(config), tokenizer).save(tmp_path_factory.mktemp("select") / "small")


def _finetune_code(model: Path, data: Path, run: Path, method: str) -> str:
    train = dict(
        out_dir=str(run), max_steps=2, micro_batch_size=2, eval_every=0, progress=False, device="cpu"
    )
    return (
        "from lmforge.recipes.finetune import finetune\n"
        f"finetune({str(model)!r}, {str(data)!r}, task='summarize', method={method!r}, packing=True,\n"
        f"         include_prompt=True, block_size=32, train={train!r})"
    )


@pytest.fixture(scope="module")
def cases(small_model: Path, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(estimate, measured peak RSS) for SmolLM2 inference and LoRA / full fine-tuning of the small model."""
    tmp = tmp_path_factory.mktemp("workloads")
    data = tmp / "abstracts.jsonl"
    lines = (TEST_DATA / "summarize_zh" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    workloads = {
        "infer": (
            dict(model=smollm2_gguf, context=32),
            f"from lmforge import LLM\nLLM.load({str(smollm2_gguf)!r}, device='cpu').generate_text("
            "'The history of the city of Rome', max_length=6)",
        ),
        "lora": (
            dict(model=small_model, mode="lora", context=32, batch=2),
            _finetune_code(small_model, data, tmp / "lora", "lora"),
        ),
        "full": (
            dict(model=small_model, mode="full", context=32, batch=2),
            _finetune_code(small_model, data, tmp / "full", "full"),
        ),
    }
    # One thread each: three workloads share two busy cores (threads' own heaps add a few percent more).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = {
        name: subprocess.Popen(
            [sys.executable, "-c", code + _PEAK],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (_, code) in workloads.items()
    }
    runtime_baseline()  # the estimate's own subprocess, while the workloads run
    results = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        peak = json.loads(out.strip().splitlines()[-1])["peak"]
        results[name] = (estimate(**workloads[name][0], measure=False), peak)
    return results


@pytest.mark.parametrize("case", ["infer", "lora", "full"])
def test_estimate_within_20_percent_of_measured_peak(cases: dict, case: str) -> None:
    predicted, peak = cases[case]
    error = predicted.peak_bytes / peak - 1
    print(
        f"\n{case}: predicted {format_size(predicted.peak_bytes)}, measured {format_size(peak)} ({error:+.1%})"
    )
    assert abs(error) <= TOLERANCE, predicted.table()


def test_estimate_breakdown_names_what_dominates(cases: dict) -> None:
    infer, lora, full = (cases[name][0] for name in ("infer", "lora", "full"))
    # SmolLM2's Q4_1 file (92 MiB) stays packed (quant="auto"): the weights in memory are the file's size and
    # the exact fp16 copies of its scales.
    weights = next(c for c in infer.components if c.name == "weights")
    assert weights.bytes < 120 * 2**20 and "210 int4 + 1 int8 layers packed" in weights.note
    # The suite decodes eagerly ($LMFORGE_COMPILE=0, as the estimate reads it): a short prompt peaks while loading.
    assert infer.peak_phase == "loading" and "compiled decode step" not in infer.table()
    # Full fine-tuning holds AdamW moments for every parameter; LoRA for its adapters only.
    moments = {e.mode: next(c.bytes for c in e.components if c.name == "AdamW moments") for e in (lora, full)}
    assert moments["full"] == 2 * 4 * full.parameters and moments["lora"] < moments["full"] / 100
    # With a 49k vocabulary the tied embedding's gradient, made twice over, is full fine-tuning's peak.
    assert full.peak_phase == "backward: embedding gradient"
    assert lora.peak_phase == "backward: at the loss"
    assert "peak (" in full.table() and "AdamW moments" in full.table()


@pytest.mark.parametrize(
    ("preset", "mode", "task"),
    list(
        itertools.product(["tiny-llama", "tiny-gpt2"], ["full", "freeze", "lora"], ["generate", "classify"])
    ),
)
def test_saved_activations_match_autograd(preset: str, mode: str, task: str) -> None:
    """The per-token rule for what autograd saves equals what a real forward pass saves (storages counted once)."""
    batch, length = 2, 16
    torch.manual_seed(0)
    config = Config.from_name(preset)
    model = Transformer(config).train()
    if task == "classify":
        model.score = nn.Linear(config.n_embd, 3, bias=False)
    choose_trainable(model, mode, 1, LoRAConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, length))
    targets = torch.randint(0, config.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.classify(ids) if task == "classify" else model(ids, targets=targets)
    shell = model_shell(
        config,
        mode,
        task=task,
        lora_rank=4,
        lora_targets=["q_proj", "v_proj", "down_proj"],
        train_last_blocks=1,
        num_labels=3,
    )
    blocks, outside, loss, _ = saved_per_token(shell, task)
    predicted = (sum(blocks) + outside + loss) * batch * length
    # Left out: GPT-2's position ids (one row, shared by the batch) and the loss's scalars.
    assert abs(predicted - sum(saved.values())) <= 8 * length + 8


# The block layouts the activation model must follow: GPT-2 (LayerNorm, GELU, biases, learned positions), Llama
# (RMSNorm, SwiGLU, RoPE, grouped-query attention: 4 query heads share 2 key/value heads) and BERT (post-norm
# EncoderBlocks with bidirectional attention over a padding mask).
FAMILIES = {
    "gpt2": Config.from_name("tiny-gpt2"),
    "llama-gqa": Config.from_name("tiny-llama"),
    "bert": Config.from_name(
        "tiny-gpt2", model_type="bert", activation="gelu", type_vocab_size=2, tie_embeddings=False
    ),
}
LORA = LoRAConfig(rank=4, targets=["q_proj", "v_proj", "up_proj", "down_proj"])


def _set_method(model: nn.Module, mode: str) -> None:
    """Fine-tuning's choice of what trains; for an encoder (lmforge does not fine-tune one) the same by hand."""
    if isinstance(model, Transformer):
        choose_trainable(model, mode, 1, LORA)
    elif mode == "lora":
        inject_lora(model, LORA)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(mode == "full" or name.startswith(f"blocks.{len(model.blocks) - 1}."))


@pytest.mark.parametrize(
    ("family", "mode", "task"),
    [
        (f, m, t)
        for f in ("gpt2", "llama-gqa")
        for m in ("full", "freeze", "lora")
        for t in ("generate", "classify")
    ]
    + [("bert", m, "embed") for m in ("full", "freeze", "lora")],
)
def test_activation_model_equals_the_real_modules_exactly(family: str, mode: str, task: str) -> None:
    """What the estimate counts per token (measured once on a fake-tensor twin of the shell, 8 tokens) equals,
    byte for byte and block by block, what autograd saves when the real Block / EncoderBlock (Attention, MLP,
    norms; frozen or LoRA-wrapped) runs on real tensors at another shape. A change to model.py moves both."""
    config = FAMILIES[family]
    with torch.device("meta"):
        shell = build_network(config.replace(extra={}))
    torch.manual_seed(0)
    real = build_network(config.replace(extra={})).train()
    for model in (shell, real):
        if task == "classify":
            model.score = nn.Linear(config.n_embd, 3, bias=False, device=model.device)
        _set_method(model, mode)
    blocks, outside, loss, _ = saved_per_token(shell, task)
    rows, tokens = 3, 11
    many, one = (saved_bytes(real, task, rows=n, tokens=tokens) for n in (rows, 1))
    assert [many.get(i, 0) for i in range(config.n_layer)] == [b * rows * tokens for b in blocks]
    assert any(blocks) and (mode != "full" or all(blocks))
    # Outside the blocks, what the rows share (GPT-2's position ids) and the loss's scalars are not per token.
    assert many.get("outside", 0) - one.get("outside", 0) == outside * (rows - 1) * tokens
    assert many.get("loss", 0) - one.get("loss", 0) == loss * (rows - 1) * tokens


def test_estimate_measures_speed_and_sizes_a_packed_model(tmp_path: Path, tiny_tokenizer) -> None:
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "tiny")
    result = estimate(folder, context=64, batch=2, quant="int8", compile=True)
    assert result.tokens_per_s and result.tokens_per_s > 0
    assert "int8 layers packed" in result.table() and "KV cache" in result.table()
    trained = estimate(folder, mode="lora", context=32, task="classify")
    assert trained.tokens_per_s and trained.trainable_parameters < trained.parameters


# ------------------------------------------------------------------- select
@pytest.fixture(scope="module")
def genre_zh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Chinese two-class set built from tests/data: 20 CSL paper abstracts ("abstract") and the verses of the
    first 20 宋词 ("poem"), alternating. It stands in for a Chinese sentiment set: those at hand carry no licence
    or a non-commercial one, so they are not in tests/data."""
    abstracts = (TEST_DATA / "summarize_zh" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    ci = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8").split("\n\n")[:20]
    rows = []
    for line, block in zip(abstracts, ci, strict=True):
        verses = block.split("\n")[1:]  # line 1 is the title (tune and author)
        rows.append({"text": json.loads(line)["text"], "label": "abstract"})
        rows.append({"text": "".join(verses), "label": "poem"})
    path = tmp_path_factory.mktemp("genre") / "genre_zh.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("candidates")
    # A long context: byte-level tokens of a tokenizer trained on five sentences make Chinese texts long.
    llama = tiny_llm("tiny-llama", tiny_tokenizer, seed=1, block_size=2048).save(folder / "tiny-llama")
    headed = tiny_llm("tiny-gpt2", tiny_tokenizer, seed=2, block_size=2048, labels=["abstract", "poem"])
    return {"llama": llama, "gpt2-head": headed.save(folder / "tiny-gpt2-head")}


def test_select_marks_a_model_that_does_not_fit(tiny_models: dict[str, Path]) -> None:
    limit = runtime_baseline()["infer"] + 256 * 2**20  # room for a tiny model, not for SmolLM2 scoring 8 rows
    result = select(
        "classify",
        TEST_DATA / "sms_spam" / "test.jsonl",
        candidates=["default", str(tiny_models["llama"])],
        max_ram=f"{limit // 2**20}MiB",
        sample=8,
    )
    first, second = result.candidates
    assert first.name == str(tiny_models["llama"]) and result.recommended == first.name
    assert 0 <= first.quality <= 1 and first.latency_ms > 0 and first.details["method"] == "0-shot"
    assert second.name == "default" and second.status.startswith("does not fit")
    assert second.quality is None  # never loaded
    assert second.memory > limit >= first.memory
    table = result.table()
    assert "does not fit" in table and f"recommended: {first.name}" in table and "accuracy" in table


def test_select_ranks_chinese_classes_and_prints_the_table(
    tiny_models: dict[str, Path], genre_zh: Path, capsys
) -> None:
    data = genre_zh
    names = [str(tiny_models["llama"]), str(tiny_models["gpt2-head"])]
    result = select("classify", data, candidates=names, sample=8, seed=3)
    assert [c.status for c in result.candidates] == ["ok", "ok"]
    methods = {c.name: c.details["method"] for c in result.candidates}
    assert methods == {names[0]: "0-shot", names[1]: "fine-tuned head"}  # the head's labels match the data
    best, other = result.candidates
    assert result.recommended == best.name
    assert (best.quality, -best.latency_ms) >= (other.quality, -other.latency_ms)
    # each accuracy with its interval, and the recommended one tested against the other on the same 8 rows
    for c in result.candidates:
        assert c.quality_ci95[0] <= c.quality <= c.quality_ci95[1] and len(c.per_example) == 8
        assert c.quality == sum(c.per_example) / 8
    (test,) = result.comparisons
    only_best = sum(a and not b for a, b in zip(best.per_example, other.per_example, strict=True))
    only_other = sum(b and not a for a, b in zip(best.per_example, other.per_example, strict=True))
    expected = binomtest(only_best, only_best + only_other).pvalue if only_best + only_other else 1.0
    assert (test["a_model"], test["b_model"], test["test"]) == (best.name, other.name, "McNemar exact")
    assert abs(test["p_value"] - expected) < 1e-9
    table = result.table()
    assert f"{best.quality:.3f} [{best.quality_ci95[0]:.3f}, {best.quality_ci95[1]:.3f}]" in table
    assert test["verdict"] in table
    if best.quality > other.quality and not test["significant"]:
        assert f"ahead of {other.name} within noise" in result.reason
    assert main(["select", "--task", "classify", "--data", str(data), "--candidates", ",".join(names),
                 "--sample", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| rank | candidate |" in out and "recommended: " in out and "genre_zh" in out
    assert "95 % bootstrap interval" in out and "paired tests on the same examples" in out


@pytest.mark.parametrize(
    ("task", "data", "metric"),
    [
        ("generate", "instruct_en/test.jsonl", "bits/byte"),
        ("summarize", "summarize_zh/test.jsonl", "ROUGE-L"),
        ("embed", "genre_zh", "1-NN accuracy"),
    ],
)
def test_select_scores_every_task(
    tiny_models: dict[str, Path], genre_zh: Path, task: str, data: str, metric: str
) -> None:
    path = genre_zh if data == "genre_zh" else TEST_DATA / data
    result = select(task, path, candidates=[str(tiny_models["llama"])], sample=2)
    (only,) = result.candidates
    assert result.metric == metric and only.status == "ok" and only.quality is not None and only.quality >= 0
    assert only.quality_ci95[0] <= only.quality + 1e-12 and only.quality <= only.quality_ci95[1] + 1e-12
    assert result.comparisons == []  # nothing to compare with
    assert result.recommended == only.name and "the only candidate" in result.reason


def test_select_recommends_nothing_when_every_candidate_is_too_slow(
    tiny_models: dict[str, Path], genre_zh: Path
) -> None:
    result = select("embed", genre_zh, candidates=[str(tiny_models["llama"])], sample=2, max_latency_ms=1e-6)
    assert result.candidates[0].status.startswith("too slow") and result.recommended is None
    assert result.reason.startswith("no candidate can be recommended") and "too slow" in result.table()


def test_select_loads_the_candidates_as_asked(
    tiny_models: dict[str, Path], genre_zh: Path, monkeypatch
) -> None:
    from lmforge.loading import LoadedModel
    from lmforge.quant import packing_summary

    load, seen = LoadedModel.load.__func__, []  # type: ignore[attr-defined]

    def recording(cls, name=None, **options):
        llm = load(cls, name, **options)
        seen.append((options, packing_summary(llm.model)))
        return llm

    monkeypatch.setattr(LoadedModel, "load", classmethod(recording))
    result = select(
        "embed", genre_zh, candidates=[str(tiny_models["llama"])], sample=2, quant="int8", compile=False
    )
    assert result.candidates[0].status == "ok"
    ((options, packing),) = seen
    assert options == {"device": "cpu", "quant": "int8", "compile": False} and "int8 linear layers" in packing


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: estimate(mode="train"), "unknown mode 'train'"),
        (lambda: estimate(context=0), "context=0 must be a positive integer"),
        (lambda: parse_size("4XB"), "cannot read the size '4XB'"),
        (
            lambda: select("classify", "no/such/file.jsonl", candidates=["default"]),
            "no/such/file.jsonl: no such file",
        ),
        (
            lambda: select("classify", TEST_DATA / "sms_spam" / "test.jsonl", candidates=[]),
            "no candidates given",
        ),
        (lambda: select("translate", "x.jsonl", candidates=["default"]), "unknown task 'translate'"),
        (lambda: select("embed", "x.jsonl", candidates=["default"], quant="int3"), "unknown quant 'int3'"),
    ],
)
def test_bad_input_is_one_line(call, message: str) -> None:
    with pytest.raises(LmforgeError) as info:
        call()
    assert str(info.value).startswith(message) and "\n" not in str(info.value) and info.value.hint


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "--mode", "train"], "unknown mode 'train'"),
        (
            ["select", "--task", "classify", "--data", "x.jsonl", "--candidates", "a", "--max-ram", "4XB"],
            "'4XB'",
        ),
        (["select", "--task", "classify", "--data", "no/such.jsonl", "--candidates", "a"], "no such file"),
        (["select", "--task", "classify", "--data", "x.jsonl", "--candidates", " , "], "no candidates given"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_parse_size_units() -> None:
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == parse_size("512m") == 512 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size(1024) == 1024


def test_package_functions_do_not_shadow_modules():
    # `import lmforge.select as m` once bound the function, not the module: a name clash in the package.
    modules = {m.name for m in pkgutil.iter_modules(lmforge.__path__)}
    assert not modules & set(lmforge.__all__)
    assert lmforge.select is select and lmforge.estimate is estimate
