"""What is packed how: `lmforge info` and the model card of a saved folder (lmforge.quant.packing_summary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import LLM
from lmforge.cli import main
from lmforge.quant import quantize_model

from .conftest import tiny_llm


def _info(argv: list[str], capsys) -> dict[str, str]:
    assert main(["info", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line[:16].strip(): line[17:] for line in lines}


def test_info_shows_the_packed_layers_of_the_bundled_gguf(smollm2_gguf: Path, capsys) -> None:
    info = _info([str(smollm2_gguf), "--no-compile"], capsys)
    assert info["format"] == "GGUF" and "int4" in info["packing"] and "MiB packed" in info["packing"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path_factory.mktemp("info") / "tiny")


def test_info_of_a_float_model_and_packed_on_request(tiny_folder: Path, capsys) -> None:
    assert _info([str(tiny_folder)], capsys)["packing"] == "not packed (float weights)"
    packed = _info([str(tiny_folder), "--quant", "int8"], capsys)["packing"]
    assert packed.startswith("15 int8 linear layers")  # 2 blocks x 7, and the output head


def test_the_model_card_says_what_was_packed(tmp_path: Path, tiny_folder: Path, tiny_tokenizer) -> None:
    card = (tiny_folder / "README.md").read_text(encoding="utf-8")
    assert "| packing | not packed (float weights) |" in card
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    quantize_model(llm.model, "int8")
    card = (llm.save(tmp_path / "packed") / "README.md").read_text(encoding="utf-8")
    assert "| packing | 15 int8 linear layers" in card and "holds them as float32" in card
    again = LLM.load(tmp_path / "packed", quant="int8")  # and the folder packs again as it says
    assert again.generate_text("hi", max_new_tokens=2, temperature=0) is not None
