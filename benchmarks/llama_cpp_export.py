"""llama.cpp runs lmforge's GGUF exports and writes the same greedy text (not part of the test suite).

    python benchmarks/llama_cpp_export.py [--steps 300] [--out benchmarks/output/llama_cpp_export]

Installs ``llama-cpp-python`` into this environment when it is missing (built from source: many minutes on two
cores), then exports SmolLM2-135M-Instruct (F32 and Q8_0) and two small models pretrained here on English and
Chinese text (GPT-2 and Llama architectures, with their own byte-level BPE tokenizer) to GGUF, loads every
file in llama.cpp and prints one table row per file and prompt: 32 greedy tokens from lmforge next to
llama.cpp's, and whether they are equal. lmforge decodes the exported file itself (for Q8_0: the dequantized
weights), so both sides see the same numbers; llama.cpp also quantizes activations for Q8_0 matrix products,
so a Q8_0 row can drift where two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from _data import add_data_option, data_files
from lmforge import LLM
from lmforge.data.text import prepare_corpus
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"
NEW_TOKENS = 32
PROMPTS = {
    "smollm2": ["The three primary colors are", "床前明月光，"],
    "pretrained": ["ROMEO:\n", "明月几时有"],
}


# ------------------------------------------------------------------------------------------ llama.cpp install
def cmake_args() -> str:
    """A portable build for this CPU's vector extensions, never AMX.

    ``GGML_NATIVE`` would enable whatever the build machine has, AMX included, and llama.cpp's AMX kernels crash
    in prefill for Q8_0 models (upstream issue #20824), so the extensions are named one by one instead.
    """
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    options = {
        "avx": "AVX",
        "avx2": "AVX2",
        "fma": "FMA",
        "f16c": "F16C",
        "bmi2": "BMI2",
        "avx512f": "AVX512",
    }
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    args += [f"-DGGML_{name}=ON" for flag, name in options.items() if flag in flags]
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    args += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    return " ".join(shlex.quote(a) for a in args)


def ensure_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        env = {**os.environ, "CMAKE_ARGS": cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        print(
            f"building llama-cpp-python {LLAMA_CPP_VERSION} with CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True
        )
        command = [sys.executable, "-m", "pip", "install", "-c", str(REPO / "constraints.txt")]
        subprocess.run([*command, f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, env=env)


# ------------------------------------------------------------------------------------------ models
def pretrained_models(out: Path, steps: int, sources: list[Path]) -> dict[str, LLM]:
    """GPT-2 and Llama shaped models, a few hundred steps on Shakespeare + 宋词 with a 2,000-token BPE."""
    corpus = []
    for source in sources:
        corpus.append(out / source.name)
        corpus[-1].write_text(source.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
    tokenizer = train_tokenizer([str(c) for c in corpus], vocab_size=2000, show_progress=False)
    prepare_corpus([str(c) for c in corpus], tokenizer, out / "data", val_fraction=0.02, show_progress=False)
    sizes = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256}
    models = {}
    for preset in ("tiny-gpt2", "tiny-llama"):
        result = pretrain(
            out / "data",
            arch=preset,
            model_config={
                **sizes,
                **({"n_kv_head": 2, "intermediate_size": 352} if preset == "tiny-llama" else {}),
            },
            train={
                "out_dir": str(out / preset),
                "max_steps": steps,
                "micro_batch_size": 16,
                "block_size": 128,
                "lr": 3e-3,
                "warmup_steps": 20,
                "eval_every": 0,
                "progress": False,
                "device": "cpu",
            },
        )
        models[preset] = LLM.load(result.model_dir, dtype="float32", device="cpu")
    return models


# ------------------------------------------------------------------------------------------ comparison
def llama_cpp_greedy(path: Path, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, 32 greedy ids) from llama.cpp on the GGUF file."""
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=256, verbose=False)
    prompt_ids = model.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    generated = []
    for token in model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == NEW_TOKENS:
            break
    model.close()
    return prompt_ids, generated


def compare(label: str, quant: str, path: Path, prompts: list[str]) -> list[list[str]]:
    ours = LLM.load(path, dtype="float32", device="cpu")
    rows = []
    for prompt in prompts:
        our_prompt = ours.tokenizer.encode(prompt)
        our_ids = ours.complete([prompt], max_new_tokens=NEW_TOKENS, stop_on_eos=False)[0].token_ids
        their_prompt, their_ids = llama_cpp_greedy(path, prompt)

        def show(ids: list[int]) -> str:
            return ours.tokenizer.decode(ids).replace("\n", "⏎").replace("|", "\\|")

        equal = our_prompt == their_prompt and our_ids == their_ids
        first = next((i for i, (a, b) in enumerate(zip(our_ids, their_ids, strict=True)) if a != b), None)
        verdict = (
            "yes" if equal else ("prompt ids differ" if our_prompt != their_prompt else f"no (token {first})")
        )
        rows.append(
            [
                label,
                quant,
                show(ours.tokenizer.encode(prompt, add_special_tokens=False)),
                show(our_ids),
                show(their_ids),
                verdict,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps of the small models")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "llama_cpp_export"))
    add_data_option(parser)
    args = parser.parse_args()
    sources = data_files(args.data, "text/tinyshakespeare.txt", "text/songci.txt")  # before a long install
    torch.set_num_threads(2)
    ensure_llama_cpp()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    smollm2 = LLM.load(None, dtype="float32", device="cpu")  # the bundled Q4_1 GGUF, dequantized
    for quant in ("f32", "q8_0"):
        options = {"quant": quant} if quant != "f32" else {"dtype": quant}
        path = smollm2.export(out / f"smollm2-135m-instruct.{quant.upper()}.gguf", format="gguf", **options)
        rows += compare("SmolLM2-135M-Instruct", quant.upper(), path, PROMPTS["smollm2"])
    del smollm2
    for preset, llm in pretrained_models(out, args.steps, sources).items():
        for quant in ("f32", "q8_0"):
            options = {"quant": quant} if quant != "f32" else {"dtype": quant}
            path = llm.export(out / f"{preset}.{quant.upper()}.gguf", format="gguf", **options)
            label = f"{preset} ({llm.config.model_type}, {args.steps} steps)"
            rows += compare(label, quant.upper(), path, PROMPTS["pretrained"])

    header = ["model", "GGUF", "prompt", f"lmforge greedy ({NEW_TOKENS} tokens)", "llama.cpp greedy", "equal"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    same = sum(row[-1] == "yes" for row in rows)
    print(f"\n{same} of {len(rows)} generations identical")


if __name__ == "__main__":
    main()
