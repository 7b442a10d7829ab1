"""The command line's first run: start-up without torch, --version, and one line (never a traceback) for every
mistake a user can make, with the exit code that says whose it was (2: the user's, 1: a bug)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import lmforge
from lmforge import LLM, runtime
from lmforge.cli import MAX_TEXT_BYTES, main
from lmforge.store import Store

from .conftest import tiny_llm

SRC = Path(lmforge.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def empty_home(monkeypatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv(runtime.HOME_ENV, str(home))
    return home


def one_line(err: str) -> str:
    """The single line of stderr, after checking that it is one line and no traceback."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def run_lmforge(*argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, runtime.HOME_ENV: str(home), "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])}
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lmforge", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


# ------------------------------------------------------------------ start-up
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["list"], ["show", "mine"], ["gc"]])
def test_help_version_and_store_commands_start_without_torch(argv: list[str], empty_home: Path) -> None:
    result = run_lmforge(*argv, home=empty_home)
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time" in line
    ]
    assert "lmforge.cli" in imported  # -X importtime did report the imports
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy")], result.stderr[-2000:]
    assert result.returncode == (2 if argv[0] == "show" else 0)


def test_version_prints_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lmforge {version('lmforge')}\n"


def test_list_on_an_empty_store(empty_home: Path, capsys) -> None:
    assert main(["list"]) == 0
    assert capsys.readouterr().out.startswith(f"no models in {empty_home} yet")


def test_from_lmforge_import_still_works() -> None:
    from lmforge import SamplingParams, Tokenizer, estimate

    assert (LLM.__name__, SamplingParams.__name__, Tokenizer.__name__, estimate.__name__) == (
        "LLM",
        "SamplingParams",
        "Tokenizer",
        "estimate",
    )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lmforge.nope  # noqa: B018


# -------------------------------------------------------- bugs and mistakes
def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys) -> None:
    def broken(self):
        raise RuntimeError("boom\non two lines")

    monkeypatch.setattr(Store, "list_models", broken)
    assert main(["list"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "`lmforge list` failed" in err and "RuntimeError: boom on two lines" in err and "report" in err
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the traceback, for the bug report
        main(["--debug", "list"])


def test_an_unreadable_path_is_the_users_error(monkeypatch, capsys) -> None:
    def denied(self):
        raise PermissionError(13, "Permission denied", "/srv/模型/manifests")

    monkeypatch.setattr(Store, "list_models", denied)
    assert main(["list"]) == 2
    assert "error: /srv/模型/manifests: Permission denied" in one_line(capsys.readouterr().err)


def test_summarize_a_missing_file_or_a_folder_is_one_line(tmp_path: Path, capsys) -> None:
    # Checked before any model loads: the default model is never needed here.
    assert main(["summarize", "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in one_line(capsys.readouterr().err)
    assert main(["summarize", "--file", str(tmp_path)]) == 2
    assert "is a folder, not a file" in one_line(capsys.readouterr().err)


def test_summarize_refuses_empty_oversized_and_non_utf8_files(tmp_path: Path, capsys) -> None:
    cases = {
        "blank.txt": (" \n\u3000\n".encode(), "no text to summarize"),  # an ideographic space is blank too
        "gbk.txt": ("这家店的菜太好吃了".encode("gbk"), "not UTF-8 text"),
        "big.txt": (b"a" * (MAX_TEXT_BYTES + 1), f"more than {MAX_TEXT_BYTES >> 20} MiB"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["summarize", "--file", str(tmp_path / name)]) == 2
        assert expected in one_line(capsys.readouterr().err)


def test_sampling_errors_name_the_flags_as_typed(capsys) -> None:
    assert main(["generate", "-p", "你好", "--top-p", "2.0", "--max-tokens", "-1"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--top-p 2.0 must be in (0, 1]" in err and "--max-tokens -1 must be >= 0" in err
    assert "top_p" not in err and "max_new_tokens" not in err


def test_a_nested_commands_errors_name_its_flags(tmp_path: Path, capsys) -> None:
    (tmp_path / "诗.txt").write_text("床前明月光，疑是地上霜。\n", encoding="utf-8")
    argv = [
        "tokenizer",
        "train",
        str(tmp_path / "诗.txt"),
        "--vocab-size",
        "0",
        "--out",
        str(tmp_path / "tok"),
    ]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: --vocab-size 0 is smaller than the alphabet") and "vocab_size" not in err


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize(
    "argv",
    [["generate", "-p", "  "], ["embed", "你好", ""], ["classify", "--labels", "a,b", " "], ["embed"]],
)
def test_empty_input_is_one_line(monkeypatch, argv: list[str], capsys) -> None:
    set_stdin(monkeypatch, b"\n \n")  # commands without text arguments read stdin: blank lines only
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert "empty" in err or "no text" in err


# ------------------------------------------------------------ with a model
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path_factory.mktemp("cli-errors") / "tiny")


@pytest.fixture(scope="module")
def headed_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    llm = tiny_llm("tiny-llama", tiny_tokenizer, seed=3, labels=["正面", "负面"])
    return llm.save(tmp_path_factory.mktemp("cli-errors") / "headed")


def test_an_empty_answer_is_said_on_stderr(tiny_folder: Path, capsys) -> None:
    assert main(["generate", str(tiny_folder), "-p", "你好", "--max-tokens", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "你好\n" and "the model's answer is empty" in one_line(captured.err)


def test_a_mistyped_model_name_suggests_the_stored_ones(tiny_folder: Path, capsys) -> None:
    Store().put(tiny_folder, "spam-filter:v1")
    Store().put(tiny_folder, "spam-filter:v2")
    for argv in (["show", "spam-filtr:v1"], ["generate", "spam-filtr:v1", "-p", "hi"]):
        assert main(argv) == 2
        err = one_line(capsys.readouterr().err)
        assert "did you mean spam-filter:v1 or spam-filter:v2?" in err
    for argv in (["show", "spam-filter"], ["rm", "spam-filter:v3"], ["generate", "spam-filter", "-p", "hi"]):
        assert main(argv) == 2
        assert "the store has spam-filter:v1, spam-filter:v2: name the tag" in one_line(
            capsys.readouterr().err
        )
    assert main(["show", "unrelated"]) == 2  # nothing near: the plain hint
    assert "see `lmforge list`" in one_line(capsys.readouterr().err)
    assert main(["generate", "完全不同", "-p", "hi"]) == 2  # not a store name at all: no crash either
    assert "no model found at '完全不同' — give a model folder" in one_line(capsys.readouterr().err)


def test_serve_on_a_busy_port_or_a_foreign_host_is_one_line(monkeypatch, capsys) -> None:
    import lmforge.cli as cli

    def no_load(args):  # the address is checked first: loading would be seconds of waiting for nothing
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"127.0.0.1:{port}: the port is in use" in one_line(captured.err)
    for argv, expected in (
        # TEST-NET-1: never this machine's (without the key check, which refuses such a host first)
        (["--host", "192.0.2.1", "--insecure-no-key"], "cannot serve on --host 192.0.2.1"),
        (["--port", "70000"], "--port 70000 is not a port"),
    ):
        assert main(["serve", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and expected in one_line(captured.err)


def test_classify_uses_the_fine_tuned_head_even_with_labels(headed_folder: Path, capsys) -> None:
    texts = ["这家店的菜太好吃了", "the food was cold"]
    llm = LLM.load(headed_folder)
    head = llm.classify_text(texts)
    assert llm.classify_text(texts, labels=["负面", "正面"]) == head  # its own labels, in any order
    zero_shot = llm.classify_text(texts, labels=["正面", "负面"], zero_shot=True)
    assert zero_shot != head  # label scoring gives other probabilities than the head

    def printed(results) -> str:
        return "".join(
            f"{r['label']}\t"
            + " ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
            + f"\t{text}\n"
            for text, r in zip(texts, results, strict=True)
        )

    assert main(["classify", "-m", str(headed_folder), "--labels", "正面,负面", *texts]) == 0
    assert capsys.readouterr().out == printed(head)
    assert main(["classify", "-m", str(headed_folder), "--labels", "正面,负面", "--zero-shot", *texts]) == 0
    assert capsys.readouterr().out == printed(zero_shot)
    assert main(["classify", "-m", str(headed_folder), "--labels", "ham,spam", *texts]) == 2
    err = one_line(capsys.readouterr().err)
    assert "not this model's fine-tuned labels ['正面', '负面']" in err and "--zero-shot" in err
    assert main(["classify", "-m", str(headed_folder), "--zero-shot", *texts]) == 2
    assert "needs candidate labels" in one_line(capsys.readouterr().err)
