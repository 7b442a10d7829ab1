"""Bad input: one clear line naming the file and the problem, exit code 2 and no traceback on the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from safetensors.torch import save_file

from lmforge import LLM, LmforgeError

from .conftest import tiny_llm


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def truncated_header(tmp_path, smollm2_gguf) -> Path:
    path = tmp_path / "cut-header.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(100_000))  # ends inside the vocabulary
    return path


@pytest.fixture()
def truncated_data(tmp_path, smollm2_gguf) -> Path:
    path = tmp_path / "cut-data.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(smollm2_gguf.stat().st_size // 2))
    return path


@pytest.fixture()
def random_bytes(tmp_path) -> Path:
    path = tmp_path / "noise.gguf"
    path.write_bytes(os.urandom(4096))
    return path


@pytest.fixture()
def lying_safetensors(tmp_path, tiny_tokenizer) -> Path:
    """A model folder whose safetensors header claims more data than the file holds."""
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "liar")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10_000_000
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    weights.write_bytes(struct.pack("<Q", len(new_header)) + new_header + raw[8 + n :])
    return folder


@pytest.fixture()
def unknown_arch_gguf(tmp_path) -> Path:
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def unknown_arch_folder(tmp_path, tiny_tokenizer) -> Path:
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "mamba-folder")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES = [
    ("truncated_header", "damaged GGUF header"),
    ("truncated_data", "truncated GGUF file"),
    ("random_bytes", "not a GGUF file"),
    ("lying_safetensors", "not a valid safetensors file"),
    ("unknown_arch_gguf", "unsupported architecture 'bert'"),
    ("unknown_arch_folder", "unsupported architecture: model_type='mamba'"),
]


@pytest.mark.parametrize(("fixture", "message"), CASES)
def test_api_raises_clear_error(fixture, message, request):
    path = request.getfixturevalue(fixture)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")) as info:
        LLM.load(path)
    assert "\n" not in str(info.value)
    assert info.value.hint


@pytest.mark.parametrize(("fixture", "message"), CASES)
def test_cli_prints_one_line_and_exits_2(fixture, message, request):
    path = request.getfixturevalue(fixture)
    result = run_cli("generate", str(path), "-p", "hi", "--max-tokens", "2")
    file_named = path.name if fixture != "unknown_arch_gguf" else "bert.gguf"
    expected = [message] if fixture.startswith("unknown_arch") else [message, file_named]
    assert_one_line_error(result, *expected)


def test_missing_file_and_bad_options_on_cli(tmp_path):
    assert_one_line_error(run_cli("info", str(tmp_path / "nope.gguf")), "nope.gguf", "no such file")
    assert_one_line_error(run_cli("info", "not/a-real-model-anywhere-xyz"), "not/a-real-model-anywhere-xyz")
    assert_one_line_error(run_cli("generate", "-p", "hi", "--top-p", "2"), "--top-p 2.0")


def test_pickle_weights_are_refused(tmp_path, tiny_tokenizer):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LmforgeError, match="never loads"):
        LLM.load(folder)


def test_weights_from_another_model_are_named(tmp_path, tiny_tokenizer):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "mixed")
    other = tiny_llm("tiny-qwen2", tiny_tokenizer)
    from lmforge.formats.hf import to_hf_state

    save_file(to_hf_state(other.model.state_dict(), other.config), str(folder / "model.safetensors"))
    with pytest.raises(LmforgeError, match="weights do not match the config"):
        LLM.load(folder)
