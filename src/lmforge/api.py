"""``LLM``: the one object users hold. Load a model from anywhere, then generate, chat and stream.

llm = LLM.load()                       # the bundled SmolLM2-135M-Instruct
llm = LLM.load("all-minilm-l6-v2")     # the packaged sentence encoder (embed and similarity only)
llm = LLM.load("runs/my-model")        # an lmforge / Hugging Face model folder
llm = LLM.load("model.Q4_K_M.gguf")    # a llama.cpp GGUF file
llm = LLM.load("spam-filter:v1")       # a model in the local store (`lmforge list`; no tag means :latest)
llm = LLM.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hugging Face hub id (needs network)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import inference
from lmforge.export import export_model
from lmforge.generate import SamplingParams, stream_completions
from lmforge.loading import LoadedModel
from lmforge.tokenizer import Message


class LLM(LoadedModel):
    """A loaded model with everything users do with it. ``LLM.load(...)`` (see ``lmforge.loading``) finds it;
    ``complete``, ``prompt_ids`` and ``eos_ids`` come from ``LoadedModel``."""

    def export(
        self,
        out: str | Path,
        format: str = "hf",
        dtype: str | None = None,
        quant: str | None = None,
        merge_lora: bool = True,
    ) -> Path:
        """Write a Hugging Face folder (``format="hf"``), a GGUF file (``"gguf"``) or, with ``merge_lora=False``,
        the PEFT adapter alone. See ``lmforge.export.export_model``."""
        return export_model(self, out, format=format, dtype=dtype, quant=quant, merge_lora=merge_lora)

    # --------------------------------------------------------------- generation
    # Lengths count NEW tokens. ``max_length`` is accepted as another spelling of ``max_new_tokens`` (lmforge's
    # first name for it) and means the same: unlike transformers' ``generate(max_length=...)``, which counts
    # prompt + new tokens, the prompt never eats into it here.
    def sampling(self, **options: Any) -> SamplingParams:
        return SamplingParams.from_kwargs(**options)

    def generate_text(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 100,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts) by up to ``max_new_tokens`` new tokens.

        Options: temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed, stop;
        num_beams > 1 searches beams instead (length_penalty, early_stopping, no_repeat_ngram_size).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        budget = _new_tokens(max_new_tokens, max_length)
        texts = [c.text for c in self.complete(prompts, max_new_tokens=budget, **options)]
        return texts[0] if isinstance(prompt, str) else texts

    def chat(
        self,
        messages: Sequence[Message] | str,
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> str:
        """Answer a conversation (rendered with the model's own chat template) in up to ``max_new_tokens``."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        budget = _new_tokens(max_new_tokens, max_length)
        return self.complete([messages], max_new_tokens=budget, **options)[0].text

    def stream(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Yield the answer piece by piece; pieces never split a character (Chinese, emoji are safe)."""
        budget = _new_tokens(max_new_tokens, max_length)
        # The best beam is known only at the end, and an encoder–decoder's output comes whole: one piece.
        if (options.get("num_beams") or 1) > 1 or self.config.is_seq2seq:
            text = self.complete([prompt], max_new_tokens=budget, **options)[0].text
            if text:
                yield text
            return
        params = self.sampling(max_new_tokens=budget, **options)
        ids = [self.prompt_ids(prompt)]
        for _, piece, _ in stream_completions(self.model, self.tokenizer, ids, params, self.eos_ids):
            if piece:
                yield piece

    # -------------------------------------------------------------------- tasks
    def classify_text(
        self,
        text: str | Sequence[str],
        labels: Sequence[str] | None = None,
        examples: Sequence[tuple[str, str]] = (),
        zero_shot: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"label": ..., "probabilities": {label: p}}`` per text: the fine-tuned head when the model has one
        (``labels`` must then be its labels), else, or with ``zero_shot=True``, zero/few-shot label scoring."""
        texts = [text] if isinstance(text, str) else list(text)
        results = inference.classify(self, texts, labels, examples, zero_shot=zero_shot)
        return results[0] if isinstance(text, str) else results

    def summarize(
        self,
        text: str | Sequence[str],
        max_length: int = 80,
        examples: Sequence[tuple[str, str]] = (),
        **options: Any,
    ) -> str | list[str]:
        """A short summary of ``text`` (or one per text of a list, generated in batches); Chinese text gets a
        Chinese prompt; text beyond the context is chunked and merged, with a warning."""
        summaries = inference.summarize(
            self, [text] if isinstance(text, str) else list(text), max_length, examples, **options
        )
        return summaries[0] if isinstance(text, str) else summaries

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings: (n_embd,) for one text, (N, n_embd) for a list."""
        vectors = inference.embed(self, [texts] if isinstance(texts, str) else list(texts))
        return vectors[0] if isinstance(texts, str) else vectors

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings."""
        return inference.similarity(self, a, b)


def _new_tokens(max_new_tokens: int, max_length: int | None) -> int:
    """The new-token budget from either spelling (``max_length`` wins when given: it is the older name)."""
    return max_new_tokens if max_length is None else max_length
