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

from lmforge import explain, inference
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

        Options: temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed, stop.
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
        params = self.sampling(max_new_tokens=_new_tokens(max_new_tokens, max_length), **options)
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

    # ------------------------------------------------------------ explanations
    def explain_generation(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 50,
        *,
        alternatives: int = 5,
        **options: Any,
    ) -> explain.TokenExplanation:
        """Generate (greedy unless sampling options say otherwise) and explain every token: probability, rank,
        entropy and the ``alternatives`` likeliest rivals; the tokens of one character (Chinese, emoji) grouped.
        Sampling options as ``generate_text``'s (``top_k`` there is sampling's, not the alternatives')."""
        return explain.explain_generation(
            self, prompt, alternatives=alternatives, max_new_tokens=max_new_tokens, **options
        )

    def explain_text(self, text: str, *, alternatives: int = 5) -> explain.TokenExplanation:
        """How likely the model found each token of a given text, with the alternatives it preferred."""
        return explain.explain_text(self, text, alternatives=alternatives)

    def explain_attention(self, text: str) -> explain.AttentionMaps:
        """Attention weights (layers, heads, T, T) over ``text``, token labels and ``.rollout()``."""
        return explain.attention_maps(self, text)

    def explain_classification(
        self,
        text: str,
        labels: Sequence[str] | None = None,
        *,
        method: str = "integrated_gradients",
        label: str | None = None,
        zero_shot: bool = False,
        steps: int = explain.DEFAULT_STEPS,
        baseline: str = "zeros",
    ) -> explain.Attribution:
        """Which tokens of ``text`` pushed the classification to ``label`` (default: the predicted one): the
        fine-tuned head when the model has one, else (or with ``zero_shot``) zero-shot scoring of ``labels``.
        ``method``: integrated_gradients (completeness error reported), gradient_x_input, occlusion,
        attention_rollout."""
        kind = "head" if self.config.labels and not zero_shot else "zero_shot"
        return explain.attribute(
            self, text, method=method, kind=kind, labels=labels, label=label, steps=steps, baseline=baseline
        )

    def explain_next_token(
        self, text: str, *, token: int | None = None, method: str = "integrated_gradients", steps: int = 32
    ) -> explain.Attribution:
        """Which tokens of ``text`` made its next token (``token``, default the likeliest) likely."""
        return explain.attribute(self, text, method=method, kind="next_token", token=token, steps=steps)

    def logit_lens(self, text: str, *, top_k: int = 3) -> explain.LogitLens:
        """The top tokens the residual stream predicts at every position after every block."""
        return explain.logit_lens(self, text, top_k=top_k)


def _new_tokens(max_new_tokens: int, max_length: int | None) -> int:
    """The new-token budget from either spelling (``max_length`` wins when given: it is the older name)."""
    return max_new_tokens if max_length is None else max_length
