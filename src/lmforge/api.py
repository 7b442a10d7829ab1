"""``LLM``: the one object users hold. Load a model from anywhere, then generate, chat and stream.

llm = LLM.load()                       # the bundled SmolLM2-135M-Instruct
llm = LLM.load("all-minilm-l6-v2")     # the packaged sentence encoder (embed and similarity only)
llm = LLM.load("runs/my-model")        # an lmforge / Hugging Face model folder
llm = LLM.load("model.Q4_K_M.gguf")    # a llama.cpp GGUF file
llm = LLM.load("spam-filter:v1")       # a model in the local store (`lmforge list`; no tag means :latest)
llm = LLM.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hugging Face hub id (needs network)
llm = LLM.load("openai:gpt-4o-mini")   # a hosted model (key from $OPENAI_API_KEY): the same methods
llm = LLM.load("openai:default", base_url="http://127.0.0.1:8000/v1")   # e.g. another `lmforge serve`
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import explain, inference
from lmforge.errors import LmforgeError
from lmforge.export import export_model
from lmforge.generate import Completion, SamplingParams, complete, stream_completions
from lmforge.hosted import DEFAULT_TIMEOUT_S, HostedLLM
from lmforge.loading import LoadedModel, hosted_model
from lmforge.structured import Constraint, ConstraintState, requested_constraint
from lmforge.tokenizer import Message
from lmforge.tools import ToolCalling, ToolReply, tool_calling


class LLM(LoadedModel):
    """A loaded model with everything users do with it. ``LLM.load(...)`` (see ``lmforge.loading``) finds it;
    ``complete``, ``prompt_ids`` and ``eos_ids`` come from ``LoadedModel``. ``LLM.load("openai:MODEL")``
    returns a ``HostedLLM`` instead: the same methods (``lmforge.hosted.TextModel``), answered by an endpoint."""

    @classmethod
    def load(
        cls,
        name_or_path: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        quant: str = "auto",
        compile: bool | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Any:  # an LLM, or a HostedLLM for "openai:MODEL"
        """``LoadedModel.load``'s names and options (dtype, device, quant, compile), and ``openai:MODEL``: a
        hosted model at ``base_url`` (default ``$OPENAI_BASE_URL``, else OpenAI's) with ``api_key`` (default
        ``$OPENAI_API_KEY``); ``timeout_s`` bounds each HTTP request."""
        if hosted_model(name_or_path) is not None:
            local = {"dtype": dtype != "auto", "device": device != "auto", "quant": quant != "auto"}
            local["compile"] = compile is not None
            if any(local.values()):
                raise LmforgeError(
                    f"{', '.join(k for k, given in local.items() if given)} do not apply to a hosted model",
                    hint="leave them out: the endpoint decides how its model runs",
                )
            return HostedLLM.load(str(name_or_path), base_url=base_url, api_key=api_key, timeout_s=timeout_s)
        if base_url is not None or api_key is not None:
            raise LmforgeError(
                "base_url and api_key are for hosted models",
                hint="name one as openai:MODEL, or leave them out",
            )
        return super().load(name_or_path, dtype=dtype, device=device, quant=quant, compile=compile)

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
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts) by up to ``max_new_tokens`` new tokens.

        Options: temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed, stop;
        num_beams > 1 searches beams instead (length_penalty, early_stopping, no_repeat_ngram_size).
        ``json_schema`` (a dict or its JSON text), ``regex`` or ``choices`` (a list of strings) constrain the
        output to match it (``lmforge.structured``); a complete match ends the text.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        budget = _new_tokens(max_new_tokens, max_length)
        constrained = {"json_schema": json_schema, "regex": regex, "choices": choices}
        texts = [c.text for c in self._complete(prompts, constrained, max_new_tokens=budget, **options)]
        return texts[0] if isinstance(prompt, str) else texts

    def chat(
        self,
        messages: Sequence[Message] | str,
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        response_format: Any = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        **options: Any,
    ) -> str | ToolReply:
        """Answer a conversation (rendered with the model's own chat template) in up to ``max_new_tokens``.

        ``response_format`` as in OpenAI's API (``{"type": "json_object"}``, ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}}``) or a pydantic model class constrains the answer to
        that JSON (``Model.model_validate_json(answer)`` parses it).

        ``tools`` (OpenAI's list of functions) and ``tool_choice`` ("auto", "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``) make the answer a ``ToolReply`` (``.content``,
        ``.tool_calls``, ``.message()`` to append to the conversation before the ``tool`` results); see
        ``lmforge.tools``. A conversation holding tool calls or results is rendered the same way."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        budget = _new_tokens(max_new_tokens, max_length)
        calling = tool_calling(tools, tool_choice, messages)
        if calling is not None:
            if response_format is not None:
                raise LmforgeError(
                    "response_format cannot be combined with tools", hint="ask for one or the other"
                )
            return self._tool_reply(calling, messages, max_new_tokens=budget, **options)
        constrained = {"response_format": response_format}
        return self._complete([messages], constrained, max_new_tokens=budget, **options)[0].text

    def stream(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        json_schema: dict[str, Any] | str | None = None,
        regex: str | None = None,
        choices: Sequence[str] | None = None,
        response_format: Any = None,
        **options: Any,
    ) -> Iterator[str]:
        """Yield the answer piece by piece; pieces never split a character (Chinese, emoji are safe).
        ``json_schema``, ``regex``, ``choices`` or ``response_format`` constrain it as in ``generate_text`` and
        ``chat``."""
        budget = _new_tokens(max_new_tokens, max_length)
        constraint = self._constraint(
            options, json_schema=json_schema, regex=regex, choices=choices, response_format=response_format
        )
        # The best beam is known only at the end, and an encoder–decoder's output comes whole: one piece.
        if _searches_beams(options) or self.config.is_seq2seq:
            text = self.complete([prompt], max_new_tokens=budget, **options)[0].text
            if text:
                yield text
            return
        params = self.sampling(max_new_tokens=budget, **options)
        ids = [self.prompt_ids(prompt)]
        states = [constraint.start()] if constraint is not None else None
        for _, piece, _ in stream_completions(
            self.model,
            self.tokenizer,
            ids,
            params,
            self.eos_ids,
            constraints=states,
            prefix_cache=self.prefix_cache,
        ):
            if piece:
                yield piece

    def _complete(
        self, prompts: Sequence[str | Sequence[Message]], constrained: dict[str, Any], **options: Any
    ) -> list[Completion]:
        """``complete``, each row under the constraint the keywords in ``constrained`` ask for (if any)."""
        constraint = self._constraint(options, **constrained)
        if constraint is None:
            return self.complete(prompts, **options)
        ids = [self.prompt_ids(p) for p in prompts]
        return self._constrained(ids, [constraint.start() for _ in ids], **options)

    def _constrained(
        self, ids: list[list[int]], states: list[ConstraintState] | None, **options: Any
    ) -> list[Completion]:
        """``generate.complete`` of token ids, each row under its constraint state (None: all free)."""
        params = SamplingParams.from_kwargs(**options)
        return complete(
            self.model,
            self.tokenizer,
            ids,
            params,
            self.eos_ids,
            constraints=states,
            prefix_cache=self.prefix_cache,
        )

    def _constraint(self, options: dict[str, Any], **constrained: Any) -> Constraint | None:
        """The constraint the keywords ask for, if any; token masks apply to one sampled or greedy sequence a
        row, so beams and encoder–decoders are one clear error."""
        constraint = requested_constraint(self.tokenizer, **constrained)
        if constraint is not None and (_searches_beams(options) or self.config.is_seq2seq):
            raise LmforgeError(
                "constrained output (json_schema, regex, choices, response_format) decodes one sequence a row "
                "of a decoder model, not beams or an encoder–decoder",
                hint="drop num_beams, or the constraint",
            )
        return constraint

    def _tool_reply(self, calling: ToolCalling, messages: Sequence[Message], **options: Any) -> ToolReply:
        constraint = calling.constraint(self.tokenizer)
        ids = [calling.prompt_ids(self.tokenizer, messages)]
        done = self._constrained(ids, None if constraint is None else [constraint.start()], **options)[0]
        return calling.reply(done.text, done.finish_reason)

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
        steps: int | None = explain.DEFAULT_STEPS,
        baseline: str = explain.DEFAULT_BASELINE,
    ) -> explain.Attribution:
        """Which tokens of ``text`` pushed the classification to ``label`` (default: the predicted one): the
        fine-tuned head when the model has one, else (or with ``zero_shot``) zero-shot scoring of ``labels``.
        ``method``: integrated_gradients (completeness error reported), gradient_x_input, occlusion,
        attention_rollout. ``steps=None`` (the default) refines integrated gradients until the completeness
        error is within 1 %; ``baseline``: mean (the average token embedding), zeros or pad."""
        kind = "head" if self.config.labels and not zero_shot else "zero_shot"
        return explain.attribute(
            self, text, method=method, kind=kind, labels=labels, label=label, steps=steps, baseline=baseline
        )

    def explain_next_token(
        self,
        text: str,
        *,
        token: int | None = None,
        method: str = "integrated_gradients",
        steps: int | None = explain.DEFAULT_STEPS,
    ) -> explain.Attribution:
        """Which tokens of ``text`` made its next token (``token``, default the likeliest) likely."""
        return explain.attribute(self, text, method=method, kind="next_token", token=token, steps=steps)

    def logit_lens(self, text: str, *, top_k: int = 3) -> explain.LogitLens:
        """The top tokens the residual stream predicts at every position after every block."""
        return explain.logit_lens(self, text, top_k=top_k)


def _new_tokens(max_new_tokens: int, max_length: int | None) -> int:
    """The new-token budget from either spelling (``max_length`` wins when given: it is the older name)."""
    return max_new_tokens if max_length is None else max_length


def _searches_beams(options: dict[str, Any]) -> bool:
    return (options.get("num_beams") or 1) > 1
