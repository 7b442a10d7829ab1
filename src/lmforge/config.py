"""One ``Config`` dataclass that describes every model family lmforge builds.

GPT-2 and the Llama family (SmolLM2, Qwen2, Mistral, Llama 3) differ only in a handful of switches: how positions
are encoded, which norm, which MLP, where biases sit, whether keys/values are shared between heads, and whether
the output head reuses the embedding. Each switch is a field here, so the model file never forks per family.
BERT-style sentence encoders (``model_type="bert"``, e.g. all-MiniLM-L6-v2) reuse the same fields; what makes
them encoders (bidirectional attention, post-norm blocks) is ``is_encoder`` and lives in ``encoder.py``.
Encoder–decoders (T5, BART, mBART) are ``n_decoder_layer`` > 0 plus the switches they need: T5's relative
position buckets and unscaled attention, BART's offset learned positions, post-norm blocks and embedding norm
(``seq2seq.py`` builds them from model.py's parts).
``from_hf`` / ``to_hf`` translate Hugging Face ``config.json`` dictionaries; named presets cover common models.

Why one module: the fields, the presets and both directions of the ``config.json`` mapping are one table read
side by side; each family's ``from_hf`` must stay the inverse of its ``to_hf`` (tests/test_model.py round-trips
every preset), which is easiest to keep true where the two sit next to the fields they fill.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge import limits
from lmforge.errors import LmforgeError, ModelFormatError, UnsupportedError

HF_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", "bert", "t5", "bart", "mbart")
# ``LLM.load``'s quant modes (``lmforge.quant`` packs the weights). Here rather than in quant.py, which imports
# torch, so that the command line lists them in ``--help`` without importing torch.
QUANT_CHOICES = ("auto", "none", "int8", "int4")
BATCH_WEIGHTS = ("auto", "packed", "packed-bf16", "bf16")  # quant.set_batch_weights: how batches multiply


@dataclass
class Config:
    name: str = "custom"
    # Which Hugging Face model_type this maps to; decides the weight names on export.
    model_type: Literal["gpt2", "llama", "qwen2", "mistral", "bert", "t5", "bart", "mbart"] = "llama"
    vocab_size: int = 32000
    block_size: int = 2048  # context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # < n_head means grouped-query attention; None means n_head
    n_embd: int = 768
    head_dim: int | None = None  # None means n_embd // n_head
    intermediate_size: int | None = None  # None means 4 * n_embd
    position: Literal["learned", "rope", "relative"] = "rope"  # relative: T5's buckets, a bias per head
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling: "linear" or "llama3"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    gated_mlp: bool = True  # SwiGLU-style gate * up -> down (Llama) instead of up -> act -> down (GPT-2)
    activation: Literal["gelu_tanh", "gelu", "silu", "relu"] = "silu"
    bias: bool = False  # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    tie_embeddings: bool = True
    sliding_window: int | None = None  # Mistral-style local attention window
    type_vocab_size: int = 0  # BERT's segment embeddings (sentence A / B)
    pooling: Literal["mean", "cls"] = "mean"  # how embed() and an encoder's classifier pool token states
    masked_lm: bool = False  # an encoder with BERT's masked-language-model head (cls.predictions)
    dropout: float = 0.0
    # Encoder–decoders: n_layer encoder blocks, then n_decoder_layer decoder blocks with cross-attention.
    n_decoder_layer: int = 0
    decoder_start_token_id: int | None = None  # the token the decoder starts from (T5: pad, BART: eos)
    position_offset: int = 0  # learned positions read row position + this (BART: 2)
    relative_buckets: int = 32  # T5: buckets of key - query distances ...
    relative_max_distance: int = 128  # ... logarithmic up to this distance
    attention_scale: float | None = None  # scores scaled by this; None: 1 / sqrt(head_dim) (T5: 1.0)
    post_norm: bool = False  # norm(x + f(x)) (BART) instead of x + f(norm(x))
    embedding_norm: bool = False  # a norm right after the embeddings (BART's layernorm_embedding)
    final_norm: bool = True  # a norm after the last block (BART has none)
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd) (mBART, BART's scale_embedding)
    scale_head_input: bool = False  # hidden states times n_embd ** -0.5 before a tied head (T5)
    logits_bias: bool = False  # a bias over the vocabulary added to the logits (BART's final_logits_bias)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # A classification head ("score", on the last real token) exists when labels are set; regression: one score.
    labels: list[str] | None = None
    regression: bool = False
    # What the head reads: the last real token's state, or the mean of every real token's ("mean").
    head_pooling: Literal["last", "mean"] = "last"
    # Lineage, LoRA settings and other records travel with the config (saved under "lmforge" in config.json).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LmforgeError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                    hint="choose sizes where n_embd is a multiple of n_head, or set head_dim explicitly",
                )
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise LmforgeError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}",
                hint="grouped-query attention needs each key/value head shared by the same number of query heads",
            )
        if self.pooling not in ("mean", "cls"):
            raise UnsupportedError(
                f"pooling {self.pooling!r} is not supported", hint="use mean or cls pooling"
            )
        if self.head_pooling not in ("last", "mean"):
            raise UnsupportedError(
                f"head pooling {self.head_pooling!r} is not supported", hint="use last or mean"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise UnsupportedError(
                    f"RoPE scaling type {kind!r} is not supported",
                    hint="supported: linear, llama3 (or no scaling)",
                )
            if kind == "default":
                self.rope_scaling = None

    def _check_sizes(self) -> None:
        """Every declared size is an integer within its documented maximum (``lmforge.limits``), before anything
        is derived from it: a config is read from files, and a million layers would build until memory runs out."""
        for name, (low, high) in _SIZE_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_SIZES:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ModelFormatError(
                    f"config {name}={value!r} is out of range (an integer from {low} to {high:,})",
                    hint="the config is damaged, or describes a model beyond lmforge's limits (docs/architecture.md)",
                )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ModelFormatError(
                f"config rope_scaling={self.rope_scaling!r} is not an object", hint="fix the config"
            )

    def check_weights(self, source: str | Path, layers: set[int], embedding: tuple[int, ...] | None) -> None:
        """Before a network is built: the layers the file holds tensors for (``layers``, their indices) are the
        config's, and the token embedding table (``embedding``, rows first; None when absent) is
        (vocab_size, n_embd). A header that declares more than the file holds is one error naming ``source``."""
        if layers != set(range(self.n_layer)):
            held = f"{len(layers)} layers' tensors" + (f" (indices up to {max(layers)})" if layers else "")
            raise ModelFormatError(
                f"{source}: declares {self.n_layer} layers, but the file holds {held}",
                hint="the config and the weights come from different models, or the file is damaged",
            )
        if embedding is not None and tuple(embedding) != (self.vocab_size, self.n_embd):
            raise ModelFormatError(
                f"{source}: declares vocabulary {self.vocab_size} x hidden {self.n_embd}, but the token "
                f"embedding is {' x '.join(map(str, embedding))}",
                hint="the config and the weights come from different models, or the file is damaged",
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise LmforgeError(
                f"unknown model preset {name!r}", hint=f"choose one of: {', '.join(sorted(PRESETS))}"
            )
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(PRESETS)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def is_encoder(self) -> bool:
        """A bidirectional sentence encoder: it embeds text but has no language-model head."""
        return self.model_type == "bert"

    @property
    def is_seq2seq(self) -> bool:
        """An encoder–decoder: the input is encoded once, the output written while attending to it."""
        return self.n_decoder_layer > 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes, without building the model."""
        d, hd, layers = self.n_embd, self.head_dim, self.n_layer
        q, kv = self.n_head * hd, self.n_kv_head * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) if (self.bias or self.qkv_bias) else 0
        attn += d if self.bias else 0
        mlp_in = (2 if self.gated_mlp else 1) * d * self.intermediate_size
        mlp = mlp_in + self.intermediate_size * d
        mlp += (self.intermediate_size + d) if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" else 1)
        block = attn + mlp + 2 * norm
        if self.is_seq2seq:  # decoder blocks add cross-attention and its norm; each stack its own extras
            stacks = layers * block + self.n_decoder_layer * (block + attn + norm)
            norms = 2 * norm * (int(self.final_norm) + int(self.embedding_norm))
            positions = {
                "learned": 2 * (self.block_size + self.position_offset) * d,
                "relative": 2 * self.relative_buckets * self.n_head,
            }.get(self.position, 0)
            head = 0 if self.tie_embeddings else self.vocab_size * d
            return stacks + norms + positions + self.vocab_size * d + head
        total = layers * block + self.vocab_size * d + norm
        total += self.block_size * d if self.position == "learned" else 0
        total += self.type_vocab_size * d
        total += 0 if self.tie_embeddings or self.is_encoder else self.vocab_size * d
        if self.is_encoder and self.masked_lm:  # dense, LayerNorm, the vocabulary bias (an untied decoder)
            total += d * d + d + 2 * d + self.vocab_size + (0 if self.tie_embeddings else self.vocab_size * d)
        if self.is_encoder and self.labels:  # BERT's pooler ([CLS] pooling), then the head with its bias
            total += (d * d + d if self.pooling == "cls" else 0) + (d + 1) * len(self.labels)
        return total

    # ------------------------------------------------------------- HF mapping
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str | None = None) -> Config:
        """Build a Config from a Hugging Face ``config.json`` dictionary."""
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise UnsupportedError(
                f"unsupported architecture: model_type={model_type!r}",
                hint=f"lmforge reads model types {', '.join(HF_MODEL_TYPES)}",
            )
        name = name or hf.get("_name_or_path") or model_type
        lmforge_extra = dict(hf.get("lmforge", {}))
        labels = lmforge_extra.pop("labels", None)
        regression = bool(lmforge_extra.pop("regression", False))
        pooling = lmforge_extra.pop("pooling", "mean")
        head_pooling = lmforge_extra.pop("head_pooling", "last")
        common = dict(
            name=name,
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            labels=labels,
            regression=regression,
            head_pooling=head_pooling,
            extra=lmforge_extra,
        )
        if model_type in ("t5", "bart", "mbart"):
            return cls(**common, **_seq2seq_from_hf(hf))
        if model_type == "bert":
            if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
                raise UnsupportedError(
                    "this BERT config uses relative positions or is a decoder",
                    hint="lmforge reads BERT-style encoders with absolute positions (e.g. all-MiniLM-L6-v2)",
                )
            # BertForMaskedLM / BertForPreTraining folders carry the MLM head (cls.predictions), tied by default.
            heads = [a for a in hf.get("architectures") or [] if isinstance(a, str)]
            masked_lm = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in heads)
            return cls(
                **common,
                block_size=hf.get("max_position_embeddings", 512),
                n_layer=hf["num_hidden_layers"],
                n_head=hf["num_attention_heads"],
                n_embd=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                position="learned",
                norm="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-12),
                gated_mlp=False,
                activation=_activation_from_hf(hf.get("hidden_act", "gelu")),
                bias=True,
                tie_embeddings=masked_lm and hf.get("tie_word_embeddings", True),
                type_vocab_size=hf.get("type_vocab_size", 2),
                pooling=pooling,
                masked_lm=masked_lm,
            )
        if model_type == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise UnsupportedError(
                    "this GPT-2 config scales attention by layer index or reorders it",
                    hint="only standard GPT-2 attention is supported",
                )
            act = hf.get("activation_function", "gelu_new")
            return cls(
                **common,
                block_size=hf.get("n_positions", 1024),
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                position="learned",
                norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                gated_mlp=False,
                activation=_activation_from_hf(act),
                bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        rope = hf.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if hf.get("mlp_bias"):
            raise UnsupportedError(
                "MLP biases in a Llama-family config", hint="only bias-free MLPs are supported"
            )
        sliding = None
        if model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window")):
            sliding = hf.get("sliding_window")
        return cls(
            **common,
            block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            position="rope",
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            gated_mlp=True,
            activation=_activation_from_hf(hf.get("hidden_act", "silu")),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", model_type != "mistral"),
            sliding_window=sliding,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dictionary for this model."""
        hf: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": "float32",
        }
        if self.is_seq2seq:
            hf.update(self._seq2seq_to_hf())
        elif self.is_encoder:
            hf.update(
                architectures=[self._bert_class()],
                max_position_embeddings=self.block_size,
                num_hidden_layers=self.n_layer,
                num_attention_heads=self.n_head,
                hidden_size=self.n_embd,
                intermediate_size=self.intermediate_size,
                hidden_act=_activation_to_hf(self.activation, gpt2=False),
                layer_norm_eps=self.norm_eps,
                type_vocab_size=self.type_vocab_size,
                position_embedding_type="absolute",
                hidden_dropout_prob=self.dropout,
                attention_probs_dropout_prob=self.dropout,
            )
        elif self.model_type == "gpt2":
            self._check_exportable_as_gpt2()
            hf.update(
                architectures=["GPT2LMHeadModel"],
                n_positions=self.block_size,
                n_ctx=self.block_size,
                n_layer=self.n_layer,
                n_head=self.n_head,
                n_embd=self.n_embd,
                n_inner=self.intermediate_size,
                activation_function=_activation_to_hf(self.activation, gpt2=True),
                layer_norm_epsilon=self.norm_eps,
                resid_pdrop=self.dropout,
                embd_pdrop=self.dropout,
                attn_pdrop=self.dropout,
            )
        else:
            self._check_exportable_as_llama()
            arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
            hf.update(
                architectures=[arch[self.model_type]],
                max_position_embeddings=self.block_size,
                num_hidden_layers=self.n_layer,
                num_attention_heads=self.n_head,
                num_key_value_heads=self.n_kv_head,
                hidden_size=self.n_embd,
                head_dim=self.head_dim,
                intermediate_size=self.intermediate_size,
                hidden_act=_activation_to_hf(self.activation, gpt2=False),
                rms_norm_eps=self.norm_eps,
                rope_theta=self.rope_theta,
                rope_scaling=self.rope_scaling,
                attention_bias=self.qkv_bias,
                attention_dropout=self.dropout,
                mlp_bias=False,
            )
            if self.model_type == "mistral":
                hf["sliding_window"] = self.sliding_window
            if self.model_type == "qwen2":
                hf["use_sliding_window"] = self.sliding_window is not None
                hf["sliding_window"] = self.sliding_window
        if self.labels:
            # transformers' *ForSequenceClassification reads these; lmforge reads its own copy below.
            hf["id2label"] = {str(i): label for i, label in enumerate(self.labels)}
            hf["label2id"] = {label: i for i, label in enumerate(self.labels)}
            hf["problem_type"] = "regression" if self.regression else "single_label_classification"
        if self.extra or self.labels or self.is_encoder:
            hf["lmforge"] = {
                **self.extra,
                **({"pooling": self.pooling} if self.is_encoder else {}),
                **({"labels": self.labels, "regression": self.regression} if self.labels else {}),
                # transformers' *ForSequenceClassification reads the last token only: written when it differs
                **(
                    {"head_pooling": self.head_pooling} if self.labels and self.head_pooling != "last" else {}
                ),
            }
        return hf

    def _bert_class(self) -> str:
        """The head decides the class transformers builds: the classifier, the MLM head, or none."""
        heads = "BertForSequenceClassification" if self.labels else "BertForMaskedLM"
        return heads if self.labels or self.masked_lm else "BertModel"

    def _seq2seq_to_hf(self) -> dict[str, Any]:
        common = dict(
            d_model=self.n_embd,
            decoder_start_token_id=self.decoder_start_token_id,
            is_encoder_decoder=True,
            forced_eos_token_id=None,  # lmforge forces no token; transformers' BART default would
        )
        if self.model_type == "t5":
            if not (self.position == "relative" and self.norm == "rmsnorm" and not self.bias):
                raise UnsupportedError(f"config {self.name!r} is not T5 shaped", hint="use a t5 preset")
            act = "gelu" if self.activation == "gelu_tanh" and self.gated_mlp else self.activation
            return dict(
                common,
                architectures=["T5ForConditionalGeneration"],
                n_positions=self.block_size,
                num_layers=self.n_layer,
                num_decoder_layers=self.n_decoder_layer,
                num_heads=self.n_head,
                d_kv=self.head_dim,
                d_ff=self.intermediate_size,
                feed_forward_proj=("gated-" if self.gated_mlp else "") + act,
                relative_attention_num_buckets=self.relative_buckets,
                relative_attention_max_distance=self.relative_max_distance,
                layer_norm_epsilon=self.norm_eps,
                dropout_rate=self.dropout,
            )
        if not (self.position == "learned" and self.norm == "layernorm" and self.bias and not self.gated_mlp):
            raise UnsupportedError(f"config {self.name!r} is not BART shaped", hint="use a bart preset")
        arch = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration"}
        return dict(
            common,
            architectures=[arch[self.model_type]],
            max_position_embeddings=self.block_size,
            encoder_layers=self.n_layer,
            decoder_layers=self.n_decoder_layer,
            encoder_attention_heads=self.n_head,
            decoder_attention_heads=self.n_head,
            encoder_ffn_dim=self.intermediate_size,
            decoder_ffn_dim=self.intermediate_size,
            activation_function=_activation_to_hf(self.activation, gpt2=True),
            scale_embedding=self.scale_embeddings,
            dropout=self.dropout,
            attention_dropout=self.dropout,
            activation_dropout=0.0,
        )

    def _check_exportable_as_gpt2(self) -> None:
        if not (self.position == "learned" and self.norm == "layernorm" and not self.gated_mlp and self.bias):
            raise UnsupportedError(
                f"config {self.name!r} is not GPT-2 shaped but model_type is 'gpt2'",
                hint="GPT-2 needs learned positions, LayerNorm, a plain MLP and biases",
            )
        if self.n_kv_head != self.n_head or self.head_dim * self.n_head != self.n_embd:
            raise UnsupportedError(
                "GPT-2 has no grouped-query attention or custom head_dim", hint="use model_type llama"
            )

    def _check_exportable_as_llama(self) -> None:
        if not (self.position == "rope" and self.norm == "rmsnorm" and self.gated_mlp and not self.bias):
            raise UnsupportedError(
                f"config {self.name!r} is not Llama shaped but model_type is {self.model_type!r}",
                hint="Llama-family models need RoPE, RMSNorm, a gated MLP and no biases outside q/k/v",
            )

    # ------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """A Hugging Face ``config.json`` (size-capped before reading); every problem is one error naming it."""
        path = Path(path)
        try:
            hf = limits.read_json_object(path, limits.MAX_CONFIG_BYTES, "config.json")
        except FileNotFoundError:
            raise ModelFormatError(
                f"{path}: no such file", hint="a model folder needs a config.json"
            ) from None
        try:
            return cls.from_hf(hf, name=path.parent.name)
        except KeyError as e:
            raise ModelFormatError(
                f"{path}: missing key {e}", hint="fix or re-download config.json"
            ) from None
        except (
            TypeError,
            ValueError,
            ArithmeticError,
            AttributeError,
        ) as e:  # a value of the wrong type or 0
            raise ModelFormatError(
                f"{path}: malformed value ({type(e).__name__}: {e})", hint="fix or re-download config.json"
            ) from None
        except LmforgeError as e:
            raise type(e)(f"{path}: {e.message}", hint=e.hint) from None


def _seq2seq_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The Config fields of a T5, BART or mBART ``config.json`` (beyond the ones every family shares)."""
    if hf["model_type"] == "t5":
        ff = hf.get("feed_forward_proj", "relu")
        gated = ff.startswith("gated-")
        act = "gelu_new" if ff == "gated-gelu" else ff.removeprefix("gated-")
        tied = hf.get("tie_word_embeddings", True) is not False
        return dict(
            block_size=hf.get("n_positions", 512),
            n_layer=hf["num_layers"],
            n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"],
            n_head=hf["num_heads"],
            n_embd=hf["d_model"],
            head_dim=hf["d_kv"],
            intermediate_size=hf["d_ff"],
            position="relative",
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            attention_scale=1.0,
            norm="rmsnorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            gated_mlp=gated,
            activation=_activation_from_hf(act),
            tie_embeddings=tied,
            scale_head_input=tied,
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        )
    heads, ffn = hf["encoder_attention_heads"], hf["encoder_ffn_dim"]
    if hf.get("decoder_attention_heads", heads) != heads or hf.get("decoder_ffn_dim", ffn) != ffn:
        raise UnsupportedError(
            "this BART config gives its encoder and decoder different heads or MLP sizes",
            hint="lmforge reads BART models whose two stacks have the same shape",
        )
    mbart = hf["model_type"] == "mbart"
    return dict(
        block_size=hf.get("max_position_embeddings", 1024),
        n_layer=hf["encoder_layers"],
        n_decoder_layer=hf["decoder_layers"],
        n_head=heads,
        n_embd=hf["d_model"],
        intermediate_size=ffn,
        position="learned",
        position_offset=2,
        norm="layernorm",
        gated_mlp=False,
        activation=_activation_from_hf(hf.get("activation_function", "gelu")),
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        post_norm=not mbart,  # mBART: pre-norm, with a norm after each stack
        final_norm=mbart,
        embedding_norm=True,
        scale_embeddings=bool(hf.get("scale_embedding", False)),
        logits_bias=True,
        decoder_start_token_id=hf.get("decoder_start_token_id", 2),
    )


def _activation_from_hf(name: str) -> str:
    table = {
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu": "gelu",
        "silu": "silu",
        "swish": "silu",
        "relu": "relu",
    }
    if name not in table:
        raise UnsupportedError(f"unsupported activation {name!r}", hint=f"supported: {', '.join(table)}")
    return table[name]


def _activation_to_hf(name: str, gpt2: bool) -> str:
    if name == "gelu_tanh":
        return "gelu_new" if gpt2 else "gelu_pytorch_tanh"
    return name


_GPT2 = dict(
    model_type="gpt2",
    vocab_size=50257,
    block_size=1024,
    position="learned",
    norm="layernorm",
    gated_mlp=False,
    activation="gelu_tanh",
    bias=True,
    tie_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
)
# Declared sizes and their inclusive bounds (lmforge.limits); the optional ones may be None (derived later).
_SIZE_BOUNDS = {
    "vocab_size": (1, limits.MAX_VOCAB),
    "block_size": (1, limits.MAX_CONTEXT),
    "n_layer": (1, limits.MAX_LAYERS),
    "n_head": (1, limits.MAX_HEADS),
    "n_kv_head": (1, limits.MAX_HEADS),
    "n_embd": (1, limits.MAX_HIDDEN),
    "head_dim": (1, limits.MAX_HEAD_DIM),
    "intermediate_size": (1, limits.MAX_INTERMEDIATE),
    "type_vocab_size": (0, limits.MAX_VOCAB),
    "sliding_window": (1, limits.MAX_CONTEXT),
    "n_decoder_layer": (0, limits.MAX_LAYERS),
    "position_offset": (0, limits.MAX_CONTEXT),
    "relative_buckets": (1, limits.MAX_CONTEXT),
    "relative_max_distance": (1, limits.MAX_CONTEXT),
}
_OPTIONAL_SIZES = ("n_kv_head", "head_dim", "intermediate_size", "sliding_window")
_LLAMA = dict(model_type="llama", position="rope", norm="rmsnorm", gated_mlp=True, activation="silu")
# BERT encoders for masked-language-model pretraining (``lmforge pretrain --objective mlm --arch bert-mini``):
# post-norm LayerNorm blocks, learned positions, segment embeddings, the MLM head tied to the word embeddings.
_BERT = dict(model_type="bert", position="learned", norm="layernorm", norm_eps=1e-12, gated_mlp=False)
_BERT |= dict(activation="gelu", bias=True, type_vocab_size=2, vocab_size=30522, block_size=512)
_BERT |= dict(pooling="cls", masked_lm=True, tie_embeddings=True)
_TINY_SEQ2SEQ = dict(vocab_size=512, block_size=128, n_layer=2, n_decoder_layer=2, n_head=4, n_embd=64)
# T5 v1.0: ReLU MLP, tied head (scaled); v1.1: gated-GELU, untied head. Both: relative buckets, RMS norm.
_T5 = dict(
    model_type="t5", position="relative", attention_scale=1.0, norm="rmsnorm", norm_eps=1e-6,
    gated_mlp=False, activation="relu", tie_embeddings=True, scale_head_input=True,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
_T5_V1_1 = {
    **_T5,
    "gated_mlp": True,
    "activation": "gelu_tanh",
    "tie_embeddings": False,
    "scale_head_input": False,
}
_BART = dict(
    model_type="bart", position="learned", position_offset=2, norm="layernorm", gated_mlp=False,
    activation="gelu", bias=True, tie_embeddings=True, post_norm=True, final_norm=False, embedding_norm=True,
    logits_bias=True, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {**_GPT2, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_head": 20, "n_embd": 1280},
    "smollm2-135m": {
        **_LLAMA,
        "vocab_size": 49152,
        "block_size": 8192,
        "n_layer": 30,
        "n_head": 9,
        "n_kv_head": 3,
        "n_embd": 576,
        "intermediate_size": 1536,
        "rope_theta": 100000.0,
        "norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "smollm2-360m": {
        **_LLAMA,
        "vocab_size": 49152,
        "block_size": 8192,
        "n_layer": 32,
        "n_head": 15,
        "n_kv_head": 5,
        "n_embd": 960,
        "intermediate_size": 2560,
        "rope_theta": 100000.0,
        "norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2.5-0.5b": {
        **_LLAMA,
        "model_type": "qwen2",
        "vocab_size": 151936,
        "block_size": 32768,
        "n_layer": 24,
        "n_head": 14,
        "n_kv_head": 2,
        "n_embd": 896,
        "intermediate_size": 4864,
        "rope_theta": 1000000.0,
        "norm_eps": 1e-6,
        "qkv_bias": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "llama-3.2-1b": {
        **_LLAMA,
        "vocab_size": 128256,
        "block_size": 131072,
        "n_layer": 16,
        "n_head": 32,
        "n_kv_head": 8,
        "n_embd": 2048,
        "intermediate_size": 8192,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "mistral-7b": {
        **_LLAMA,
        "model_type": "mistral",
        "vocab_size": 32768,
        "block_size": 32768,
        "n_layer": 32,
        "n_head": 32,
        "n_kv_head": 8,
        "n_embd": 4096,
        "intermediate_size": 14336,
        "rope_theta": 1000000.0,
        "tie_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # nanoGPT's "baby shakespeare": a character-level model that trains in minutes on a CPU.
    "baby-gpt": {**_GPT2, "vocab_size": 65, "block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384},
    # Tiny shapes for tests and quick experiments.
    "tiny-gpt2": {**_GPT2, "vocab_size": 512, "block_size": 128, "n_layer": 2, "n_head": 4, "n_embd": 64},
    "tiny-llama": {
        **_LLAMA,
        "vocab_size": 512,
        "block_size": 128,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "n_embd": 64,
        "intermediate_size": 160,
        "tie_embeddings": False,
    },
    # Google's compact BERTs (Turc et al. 2019): tiny 2x128, mini 4x256, small 4x512; base 12x768.
    "bert-tiny": {**_BERT, "n_layer": 2, "n_head": 2, "n_embd": 128},
    "bert-mini": {**_BERT, "n_layer": 4, "n_head": 4, "n_embd": 256},
    "bert-small": {**_BERT, "n_layer": 4, "n_head": 8, "n_embd": 512},
    "bert-base": {**_BERT, "n_layer": 12, "n_head": 12, "n_embd": 768},
    "t5-small": {
        **_T5,
        "vocab_size": 32128,
        "block_size": 512,
        "n_layer": 6,
        "n_decoder_layer": 6,
        "n_head": 8,
        "n_embd": 512,
        "head_dim": 64,
        "intermediate_size": 2048,
    },
    "bart-base": {
        **_BART,
        "vocab_size": 50265,
        "block_size": 1024,
        "n_layer": 6,
        "n_decoder_layer": 6,
        "n_head": 12,
        "n_embd": 768,
        "intermediate_size": 3072,
    },
    "tiny-t5": {**_T5, **_TINY_SEQ2SEQ, "head_dim": 8, "intermediate_size": 96},
    "tiny-t5-v1.1": {**_T5_V1_1, **_TINY_SEQ2SEQ, "head_dim": 8, "intermediate_size": 96},
    "tiny-bart": {**_BART, **_TINY_SEQ2SEQ, "intermediate_size": 96},
    # mBART: BART's parts, pre-norm with a norm after each stack, embeddings scaled by sqrt(n_embd).
    "tiny-mbart": {
        **_BART,
        **_TINY_SEQ2SEQ,
        "model_type": "mbart",
        "intermediate_size": 96,
        "post_norm": False,
        "final_norm": True,
        "scale_embeddings": True,
    },
    "tiny-qwen2": {
        **_LLAMA,
        "model_type": "qwen2",
        "vocab_size": 512,
        "block_size": 128,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 1,
        "n_embd": 64,
        "intermediate_size": 160,
        "qkv_bias": True,
        "norm_eps": 1e-6,
    },
}
