"""The command line's shared options: --quant / --no-compile on every command that loads a model for
inference, and the global --threads, set once at start (the server's scheduler thread runs with it)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from lmforge import LLM, runtime
from lmforge.cli import build_parser, main
from lmforge.quant import QUANT_CHOICES

from .conftest import TEST_DATA, tiny_llm

# Each inference command with the arguments it requires.
INFERENCE_COMMANDS = {
    "generate": ["generate", "-p", "hi"],
    "chat": ["chat"],
    "classify": ["classify", "a text"],
    "embed": ["embed", "a text"],
    "summarize": ["summarize"],
    "info": ["info"],
    "serve": ["serve"],
    "eval": ["eval", "--task", "perplexity", "--data", "x.txt"],
    "select": ["select", "--task", "classify", "--data", "x.jsonl", "--candidates", "a"],
    "quickstart": ["quickstart"],
    "estimate": ["estimate"],  # sizes the model as these load it
}


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch, tmp_path: Path):
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_threads", runtime._threads)
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))  # `list` reads a store; not the user's
    monkeypatch.delenv(runtime.INDUCTOR_CACHE_ENV, raising=False)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", INFERENCE_COMMANDS)
def test_every_inference_command_takes_quant_and_compile(command: str) -> None:
    argv = INFERENCE_COMMANDS[command]
    defaults = build_parser().parse_args(argv)
    # Commands that run long compile unless $LMFORGE_COMPILE=0 (None: LLM.load decides); one-shot ones decode
    # eagerly (the compiler's start-up costs more than it saves on one answer).
    long_running = command in ("serve", "eval", "select")
    assert (defaults.quant, defaults.compile) == ("auto", None if long_running else False)
    for quant in QUANT_CHOICES:
        args = build_parser().parse_args([*argv, "--quant", quant, "--no-compile"])
        assert (args.quant, args.compile) == (quant, False)
        assert build_parser().parse_args([*argv, "--quant", quant, "--compile"]).compile is True


def test_an_unknown_quant_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "-p", "hi", "--quant", "int3"])
    assert exit_info.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path_factory.mktemp("cli") / "tiny")


def _recording_load(monkeypatch) -> list[dict]:
    """LLM.load, recording the options each call got."""
    calls: list[dict] = []
    load = LLM.load.__func__  # type: ignore[attr-defined]

    def recording(cls, name_or_path=None, **options):
        calls.append(options)
        return load(cls, name_or_path, **options)

    monkeypatch.setattr(LLM, "load", classmethod(recording))
    return calls


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_quant_and_no_compile_reach_llm_load(monkeypatch, tiny_folder: Path, quant: str, capsys) -> None:
    calls = _recording_load(monkeypatch)
    argv = ["generate", str(tiny_folder), "-p", "hi", "--max-tokens", "2", "--quant", quant, "--no-compile"]
    assert main(argv) == 0
    assert calls == [{"dtype": "auto", "device": "auto", "quant": quant, "compile": False}]
    assert main(["embed", "-m", str(tiny_folder), "a text"]) == 0
    assert calls[-1]["quant"] == "auto" and calls[-1]["compile"] is False  # a one-shot command: eager
    assert capsys.readouterr().out.count("embedding") == 1


def test_eval_passes_quant_and_names_the_packed_rows(tmp_path: Path, tiny_folder: Path, capsys) -> None:
    data = tmp_path / "text.txt"
    data.write_text((TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8")[:400], encoding="utf-8")
    argv = [
        "eval",
        str(tiny_folder),
        "--task",
        "perplexity",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*argv, "--quant", "int8", "--no-compile"]) == 0
    assert f"| {tiny_folder} (int8) |" in capsys.readouterr().out


def test_threads_are_set_once_at_start(tiny_folder: Path, capsys) -> None:
    assert (
        main(["--threads", "1", "generate", str(tiny_folder), "-p", "hi", "--max-tokens", "1", "--quiet"])
        == 0
    )
    assert torch.get_num_threads() == 1
    assert main(["--threads", "0", "generate", "-p", "hi"]) == 2  # checked before any model loads
    err = capsys.readouterr().err
    assert err.startswith("error: --threads 0 is not a number of threads") and err.count("\n") == 1


def test_an_invalid_threads_variable_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv(runtime.THREADS_ENV, "many")
    assert main(["generate", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "$LMFORGE_THREADS='many'" in err and err.count("\n") == 1


def test_the_server_runs_with_the_cli_threads(monkeypatch, tiny_folder: Path, capsys) -> None:
    import uvicorn

    from lmforge import serve

    seen: dict[str, int] = {}

    class FakeServer:
        def __init__(self, config) -> None:
            pass

        def run(self) -> None:  # the scheduler decodes in its own thread: what does one see?
            thread = threading.Thread(target=lambda: seen.update(threads=torch.get_num_threads()))
            thread.start()
            thread.join()

    # No uvicorn.Config either: it would point uvicorn's log handlers at this test's captured stderr.
    monkeypatch.setattr(serve, "uvicorn_config", lambda app, *args, **kwargs: app)
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(runtime, "_configured", False)  # as in a fresh process: LLM.load would set it up
    torch.set_num_threads(2)
    assert main(["--threads", "1", "serve", str(tiny_folder), "--no-compile"]) == 0
    assert seen == {"threads": 1}
    assert "(threads: 1)" in capsys.readouterr().out
