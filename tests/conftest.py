"""Shared fixtures: a tiny byte-level tokenizer, the bundled SmolLM2 GGUF, and transformers as the oracle."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import LLM, Config, Tokenizer, Transformer, cpu_kernel, runtime
from lmforge.loading import bundled_model_path

# Two threads at most, here and in `lmforge` commands run in-process or as children (they read the variable); under
# pytest-xdist (`make test` runs two workers) the workers share the cores instead of oversubscribing them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault(runtime.THREADS_ENV, str(max(1, min(2, (os.cpu_count() or 1) // _workers))))
runtime.set_threads()
# Decode eagerly unless a test asks for the compiled step (tests/test_generate.py checks it against eager): each new
# model shape would otherwise wait for inductor, and the suite has to fit 15 minutes on 2 cores.
os.environ.setdefault(runtime.COMPILE_ENV, "0")
# Compiled decoding caches its kernels here, not under the user's ~/.lmforge (LLM.load's default).
os.environ.setdefault(runtime.INDUCTOR_CACHE_ENV, str(Path(tempfile.gettempdir()) / "lmforge-tests-inductor"))
# The first packed layer on a machine builds lmforge's float32 kernel (~20 s, once; the other workers wait for it):
# here, before any test times a load or a parse (tests/test_fuzz_readers.py counts a parse over 5 s as a hang).
cpu_kernel.available()


@contextlib.contextmanager
def one_intra_op_thread():
    """Tiny models run on one intra-op thread: their matrices are too small to share, and on a busy machine
    the threads' hand-offs make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with one_intra_op_thread():
        yield


REPO = Path(__file__).resolve().parents[1]
# Small excerpts of permissively licensed public data sets (tests/data/SOURCES.md): the suite reads nothing
# outside the repository.
TEST_DATA = Path(__file__).parent / "data"

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "To be, or not to be, that is the question.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京吃烤鸭 🦆, then fly home ✈️.",
    "def hello():\n    return 'world'",
]


def data_lines(relative: str, field: str | None = None, limit: int = 100) -> list[str]:
    """Up to ``limit`` non-empty lines (or JSONL field values) from tests/data."""
    path = TEST_DATA / relative
    out: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            out.append(json.loads(line)[field] if field else line)
            if len(out) >= limit:
                break
    return out


def train_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SAMPLE_TEXT * 20, trainer=trainer)
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return train_tiny_tokenizer()


def tiny_llm(preset: str, tokenizer: Tokenizer, seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    config = Config.from_name(
        preset, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, **overrides
    )
    model = Transformer(config)
    # Random init puts all weights near zero; widen norms so parity tests exercise real numbers.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return LLM(model, tokenizer, source=preset)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> LLM:
    return LLM.load(smollm2_gguf, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    """transformers' own GGUF loader: the reference SmolLM2 (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def songci_next_verse_items(n: int) -> list[dict]:
    """Chinese multiple choice built from 宋词 (public domain; CMMLU is non-commercial, so not in tests/data):
    which of four verses follows a ci's first verse. Ci i's second verse is the answer, at position i % 4,
    among the second verses of three later ci."""
    text = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8")
    ci = [block.split("\n") for block in text.split("\n\n")[: 4 * n]]  # title line, then one verse a line
    items = []
    for i in range(n):
        choices = [lines[2] for lines in ci[n + 3 * i : n + 3 * i + 3]]
        choices.insert(i % 4, ci[i][2])
        question = f"{ci[i][0]}\n{ci[i][1]}\n下一句是？"
        items.append({"question": question, "choices": choices, "answer": i % 4})
    return items
