"""T5 exported to GGUF runs in llama.cpp itself (llama-cpp-python): same tokens, same logits as lmforge.

Random small T5s (v1.0: ReLU, tied head; v1.1: gated GELU, untied head) with unigram tokenizers trained here on
English and Chinese text (``tokenizers``' trainer, and SentencePiece itself laid out as T5's tokenizer.json);
llama.cpp tokenizes, runs the encoder once and the decoder for 8 greedy steps, and every step's logits are
compared with lmforge's. Needs llama-cpp-python (a dev dependency).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge import LLM, Config
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.seq2seq import Seq2SeqTransformer
from lmforge.tokenizer import Tokenizer

from .conftest import SAMPLE_TEXT

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们一起去公园散步。",
    "人工智能正在改变世界 and the world changes too",
]
STEPS = 8
# llama.cpp logs every load and context to stderr; a module-level reference keeps the callback alive
_QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)


@pytest.fixture(scope="module")
def unigram() -> Tokenizer:
    """A T5-shaped tokenizer: unigram pieces, '▁' for spaces, </s> appended, ids 0-2 pad, eos, unk."""
    backend = HFTokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator((SAMPLE_TEXT + TEXTS) * 10, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_sentencepiece() -> tuple[Tokenizer, sentencepiece.SentencePieceProcessor]:
    """A tokenizer laid out as T5's own tokenizer.json (converted by transformers from SentencePiece): pieces and
    scores of a SentencePiece unigram model trained here, its NFKC character map, runs of spaces collapsed."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((SAMPLE_TEXT + TEXTS + ["ＦＵＬＬ width ｔｅｘｔ １２３"]) * 10),
        model_writer=model,
        model_type="unigram",
        vocab_size=200,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    backend = HFTokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=2))
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = Tokenizer(backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return tokenizer, sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def random_t5(preset: str, tokenizer: Tokenizer, **overrides) -> LLM:
    torch.manual_seed(0)
    config = Config.from_name(
        preset,
        vocab_size=512,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=tokenizer.pad_id,
        **overrides,
    )
    model = Seq2SeqTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # wider than the init, so the logits vary with the input
                p.normal_(0.0, 0.05)
    return LLM(model, tokenizer, source=preset)


@contextlib.contextmanager
def llama_cpp_model(path) -> Iterator[tuple[object, object]]:
    """llama.cpp's model and a context: one thread, F32 key/value cache, no flash attention (no F16 steps)."""
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 128
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        yield model, ctx
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def llama_cpp_tokens(model, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode()
    out = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), out, 256, True, False)
    assert n >= 0
    return list(out[:n])


def llama_cpp_greedy(model, ctx, ids: list[int], vocab_size: int) -> tuple[list[int], np.ndarray]:
    """Encode ``ids``, then decode STEPS greedy tokens one at a time: (decoder inputs, logits (STEPS, V))."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    assert llama_cpp.llama_encode(ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))) == 0
    inputs, rows = [llama_cpp.llama_model_decoder_start_token(model)], []
    for _ in range(STEPS):
        token = (llama_cpp.llama_token * 1)(inputs[-1])
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(token, 1)) == 0
        logits = llama_cpp.llama_get_logits_ith(ctx, -1)
        rows.append(np.ctypeslib.as_array(logits, shape=(vocab_size,)).copy())
        inputs.append(int(rows[-1].argmax()))
    return inputs[:-1], np.stack(rows)


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (tanh form): read from a table indexed by the input rounded to fp16, itself fp16."""
    table = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), table))


def _relative(ours: torch.Tensor, theirs: np.ndarray) -> float:
    ours_np = ours.numpy()
    return float(np.abs(ours_np - theirs).max() / np.abs(ours_np).max())


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-t5-v1.1"])
def test_llama_cpp_runs_the_exported_t5(preset, unigram, tmp_path, one_thread):
    llm = random_t5(preset, unigram)
    # the same weights, with ggml's GELU: what remains of the difference is that table (v1.0 has no GELU)
    ggml_like = random_t5(preset, unigram)
    for mlp in (m for m in ggml_like.model.modules() if getattr(m, "gate_proj", None) is not None):
        mlp.act = ggml_gelu
    path = llm.export(tmp_path / "t5.gguf", format="gguf")
    with llama_cpp_model(path) as (model, ctx):
        assert llama_cpp.llama_model_has_encoder(model)
        assert llama_cpp.llama_model_decoder_start_token(model) == llm.config.decoder_start_token_id
        for text in TEXTS:
            ids = unigram.encode(text)
            assert llama_cpp_tokens(model, text) == ids, text  # the same pieces, </s> appended
            inputs, theirs = llama_cpp_greedy(model, ctx, ids, llm.config.vocab_size)
            with torch.no_grad():
                ours, _ = llm.model(torch.tensor([ids]), decoder_ids=torch.tensor([inputs]))
                emulated, _ = ggml_like.model(torch.tensor([ids]), decoder_ids=torch.tensor([inputs]))
            assert inputs[1:] == ours[0].argmax(-1)[:-1].tolist()  # the same greedy tokens
            assert _relative(ours[0], theirs) <= 1e-3
            # not exact: an input within a few fp32 ulps of an fp16 rounding boundary may take the neighbouring
            # table entry in one engine and not the other (1e-5 on an AVX-512 Xeon, 1.1e-4 on CI's CPU)
            assert _relative(emulated[0], theirs) <= 5e-4


def test_a_sentencepiece_t5_tokenizer_splits_as_sentencepiece_does(t5_sentencepiece, tmp_path, one_thread):
    tokenizer, reference = t5_sentencepiece
    llm = random_t5("tiny-t5-v1.1", tokenizer)
    with llama_cpp_model(llm.export(tmp_path / "t5.gguf", format="gguf")) as (model, ctx):
        # full-width letters and digits (NFKC, from the character map), runs of spaces, Chinese
        for text in [*TEXTS, "ＦＵＬＬ width ｔｅｘｔ １２３", "the   lazy  dog", "床前明月光"]:
            expected = [*reference.encode(text), 1]
            assert tokenizer.encode(text) == expected, text
            assert llama_cpp_tokens(model, text) == expected, text
        ids = tokenizer.encode(TEXTS[1])
        inputs, theirs = llama_cpp_greedy(model, ctx, ids, llm.config.vocab_size)
        with torch.no_grad():
            ours, _ = llm.model(torch.tensor([ids]), decoder_ids=torch.tensor([inputs]))
        assert inputs[1:] == ours[0].argmax(-1)[:-1].tolist()
        assert _relative(ours[0], theirs) <= 1e-3


def test_a_byte_level_bpe_t5_runs_too(tiny_tokenizer, tmp_path, one_thread):
    llm = random_t5("tiny-t5", tiny_tokenizer)
    with llama_cpp_model(llm.export(tmp_path / "t5.gguf", format="gguf")) as (model, ctx):
        ids = tiny_tokenizer.encode(TEXTS[2])
        assert llama_cpp_tokens(model, TEXTS[2]) == ids
        inputs, theirs = llama_cpp_greedy(model, ctx, ids, llm.config.vocab_size)
        with torch.no_grad():
            ours, _ = llm.model(torch.tensor([ids]), decoder_ids=torch.tensor([inputs]))
        assert _relative(ours[0], theirs) <= 1e-5


def test_quantized_t5_loads_and_cli_writes_it(unigram, tmp_path, capsys, one_thread):
    folder = random_t5("tiny-t5-v1.1", unigram).save(tmp_path / "model")
    out = tmp_path / "t5.q8_0.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    with llama_cpp_model(out) as (model, ctx):
        loaded = LLM.load(folder, dtype="float32", device="cpu").model
        assert llama_cpp.llama_model_n_params(model) == sum(p.numel() for p in loaded.parameters())
        inputs, _ = llama_cpp_greedy(model, ctx, unigram.encode(TEXTS[1]), 512)
        assert len(inputs) == STEPS


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("tiny-bart", {}, "llama.cpp has no bart architecture"),
        ("tiny-mbart", {}, "llama.cpp has no mbart architecture"),
        ("tiny-t5", {"relative_max_distance": 64}, "llama.cpp's T5 needs bucket distances up to 128"),
    ],
)
def test_what_llama_cpp_cannot_run_is_one_line(preset, overrides, message, tiny_tokenizer, tmp_path, capsys):
    config = Config.from_name(preset, vocab_size=512, **overrides)
    llm = LLM(Seq2SeqTransformer(config), tiny_tokenizer, source=preset)
    with pytest.raises(LmforgeError, match=message) as caught:
        llm.export(tmp_path / "x.gguf", format="gguf")
    assert "--format hf" in caught.value.hint
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    folder = llm.save(tmp_path / "model")
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert message in err and "--format hf" in err and err.count("\n") == 1
