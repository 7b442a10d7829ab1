"""The SmolLM2 files the inference benchmarks compare: the shipped Q4_1 GGUF and a Q8_0 export of it."""

from __future__ import annotations

from pathlib import Path

from lmforge.export import export_model
from lmforge.loading import bundled_model_path

OUTPUT = Path(__file__).resolve().parent / "output"


def smollm2_files(out_dir: Path = OUTPUT) -> dict[str, Path]:
    """{"Q4_1": the shipped file, "Q8_0": ``lmforge export --quant q8_0`` of it (written once, then reused)}.

    The Q8_0 file quantizes the Q4_1 file's dequantized weights: the same model, stored at 8 bits.
    """
    q4 = bundled_model_path()
    q8 = out_dir / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not q8.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        export_model(q4, q8, format="gguf", quant="q8_0")
    return {"Q4_1": q4, "Q8_0": q8}
