"""Export: take a model out of lmforge in the formats other tools run.

    export_model("runs/x/model", "out/x-hf", format="hf")                    # transformers / PEFT folder
    export_model("runs/x/model", "out/x.Q8_0.gguf", format="gguf", quant="q8_0")   # llama.cpp / Ollama
    export_model(llm_with_lora, "out/adapter", merge_lora=False)             # the PEFT adapter alone

A model with LoRA adapters exports merged (the adapters folded into the weights) unless ``merge_lora=False``,
which writes only the adapter, in PEFT's layout, next to which the base model's own export is the base.
Every write is atomic: a failed export leaves whatever was at ``out`` before.

Packed layers (``quant``, e.g. a Q4_1 GGUF loaded as int4) go to a GGUF file as their integer codes and scales:
int4 -> Q4_1 and int8 -> Q8_0 are written without a dequantize/requantize round trip (``gguf_writer``'s
``packed_blocks``); other pairings, and every Hugging Face export, dequantize them first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lmforge import lora
from lmforge.config import Config
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.formats.folder import atomic_write_folder, write_model_files
from lmforge.formats.gguf_t5 import write_t5_gguf
from lmforge.formats.gguf_writer import check_file_type, write_gguf
from lmforge.formats.peft import save_adapter
from lmforge.loading import LoadedModel
from lmforge.quant import PackedEmbedding, QuantizedWeight, float_state_dict, packed_layers

FORMATS = ("hf", "gguf")
FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def export_model(
    model: LoadedModel | str | Path | None,
    out: str | Path,
    format: str = "hf",
    dtype: str | None = None,
    quant: str | None = None,
    merge_lora: bool = True,
) -> Path:
    """Write ``model`` (an ``LLM``, or anything ``LLM.load`` accepts) to ``out``; returns the path written.

    ``format="hf"``: a model folder that ``transformers`` loads (``dtype`` f32 / f16 / bf16, default f32).
    ``format="gguf"``: one GGUF file for llama.cpp, with ``dtype`` f32 / f16 / bf16 or ``quant`` q8_0 / q4_0 /
    q4_1 / q5_0 / q5_1 (default f32, lossless); a decoder, or a T5 as llama.cpp's ``t5`` (``formats/gguf_t5``).
    ``merge_lora=False``: write only the model's LoRA adapter, as a PEFT adapter folder.
    """
    out, format = Path(out).expanduser(), format.lower()
    file_type = _check_options(out, format, dtype, quant, merge_lora)
    llm = model if isinstance(model, LoadedModel) else LoadedModel.load(model, dtype="float32", device="cpu")
    if not merge_lora:
        return save_adapter(llm.model, out, base_model=llm.source)
    transformer = llm.model
    if lora.lora_layers(transformer):
        # Merge a copy: the caller's model keeps its adapters (and can still be trained or exported unmerged).
        transformer = lora.merge_lora(copy.deepcopy(transformer))
    # an encoder–decoder as llama.cpp's t5 (BART, mBART: one line saying why, and to export an HF folder)
    if format == "gguf" and transformer.config.is_seq2seq:
        return write_t5_gguf(out, transformer.config, _gguf_state(transformer), llm.tokenizer, file_type)
    if format == "gguf":
        return write_gguf(out, transformer.config, _gguf_state(transformer), llm.tokenizer, file_type)
    state = float_state_dict(transformer)  # packed int4/int8 layers as float weights, the form files take
    return _write_hf(out, llm, transformer.config, state, file_type)


def _gguf_state(model: torch.nn.Module) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The model's weights for the GGUF writer, in the model's order: floats as they are, packed layers as their
    integer codes and scales (``PackedLinear.unpacked``), which the writer turns into blocks directly where the
    file type holds them. A packed embedding table is the tied head's codes."""
    packed = {name: layer.unpacked() for name, layer in packed_layers(model).items()}
    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    if isinstance(getattr(model, "wte", None), PackedEmbedding):  # packed only when tied to the head
        state["wte.weight"] = packed["lm_head"] if "lm_head" in packed else model.wte.weight
    for key, tensor in model.state_dict().items():
        owner, _, field = key.rpartition(".")
        if owner not in packed or field == "bias":
            state[key] = tensor
        elif (
            f"{owner}.weight" not in state
        ):  # once per layer (a tied head: the table, which the writer skips)
            state[f"{owner}.weight"] = packed[owner]
    return state


def _check_options(out: Path, format: str, dtype: str | None, quant: str | None, merge_lora: bool) -> str:
    """Every option checked before a model is loaded; returns the weight type (f32, q8_0, ...)."""
    if format not in FORMATS:
        raise LmforgeError(f"unknown export format {format!r}", hint="use --format hf or --format gguf")
    if dtype is not None:
        # Accept torch's spellings too: float16, fp16, bfloat16 ...
        dtype = dtype.lower().replace("bfloat", "bf").replace("float", "f").replace("fp", "f")
        if dtype not in FLOAT_TYPES:
            raise LmforgeError(f"unknown dtype {dtype!r}", hint="use f32, f16 or bf16")
    if format == "hf" and quant is not None:
        raise LmforgeError(
            f"--quant {quant} needs --format gguf",
            hint="quantized weights are a GGUF (llama.cpp) feature; a Hugging Face export takes --dtype",
        )
    if dtype is not None and quant is not None:
        raise LmforgeError(
            "give --dtype or --quant, not both", hint="--quant already sets the type of the weights"
        )
    if not merge_lora and format == "gguf":
        raise UnsupportedError(
            "an unmerged LoRA adapter cannot be exported to GGUF",
            hint="export the adapter with --format hf --no-merge, or leave --no-merge out to merge it",
        )
    if format == "gguf" and out.is_dir():
        raise LmforgeError(
            f"{out} is a folder; a GGUF export is one file", hint="give a path like model.gguf"
        )
    if format == "hf" and out.is_file():
        raise LmforgeError(
            f"{out} is a file; a Hugging Face export is a folder", hint="give a new folder path for --out"
        )
    if format == "hf" and out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        # The export replaces the folder as a whole: never let that swallow a folder of other things.
        raise LmforgeError(
            f"{out} exists and is not a model folder", hint="choose a new or empty folder for --out"
        )
    return check_file_type(quant) if quant is not None else dtype or "f32"


def _write_hf(
    out: Path, llm: LoadedModel, config: Config, state: dict[str, torch.Tensor], dtype: str
) -> Path:
    state = {k: v.to(FLOAT_TYPES[dtype]) for k, v in state.items()}

    def write(folder: Path) -> None:
        write_model_files(folder, config, state, llm.tokenizer, llm.generation_config)
        # config.json names the stored dtype, so transformers' dtype="auto" loads the weights as they are.
        path = folder / "config.json"
        hf = json.loads(path.read_text(encoding="utf-8"))
        hf["torch_dtype"] = _HF_DTYPE_NAMES[dtype]
        path.write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_write_folder(out, write)
