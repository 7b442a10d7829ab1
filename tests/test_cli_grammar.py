"""One grammar for every command: MODEL positional or -m/--model wherever a model is loaded, texts positional or
--file, --arch for a new model's architecture, --out wherever something is written; old spellings still work
for a release with one deprecation line. Also: tokens/s on stderr (--quiet hides it), the warmup warning,
quickstart --no-pretrain, and every flag's help saying its default."""

from __future__ import annotations

import argparse
import builtins
from pathlib import Path

import pytest
import torch

from lmforge import LLM, cli, quickstart, runtime
from lmforge.cli import build_parser, main
from lmforge.data.text import prepare_corpus
from lmforge.recipes.pretrain import PretrainSettings
from lmforge.train.schedule import learning_rate, warmup_note

from .conftest import SAMPLE_TEXT, tiny_llm


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch, tmp_path: Path):
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_threads", runtime._threads)
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path_factory.mktemp("grammar") / "tiny")


def parsed(argv: list[str]) -> argparse.Namespace:
    """The arguments as a command sees them: parsed, with the model named either way merged."""
    args = build_parser().parse_args(argv)
    cli._merge_model(args)
    return args


# Every command that loads a model, with what else it requires: (MODEL positional, -m MODEL); None where
# the command's positional arguments are texts (its model is only -m/--model).
MODEL_COMMANDS = {
    "generate": (["generate", "X", "-p", "hi"], ["generate", "-m", "X", "-p", "hi"]),
    "chat": (["chat", "X"], ["chat", "--model", "X"]),
    "info": (["info", "X"], ["info", "-m", "X"]),
    "serve": (["serve", "X"], ["serve", "-m", "X"]),
    "export": (["export", "X", "--out", "o"], ["export", "-m", "X", "--out", "o"]),
    "estimate": (["estimate", "X"], ["estimate", "--model", "X"]),
    "finetune": (["finetune", "X", "--data", "d"], ["finetune", "-m", "X", "--data", "d"]),
    "classify": (None, ["classify", "-m", "X", "a text"]),
    "embed": (None, ["embed", "--model", "X", "a text"]),
    "summarize": (None, ["summarize", "-m", "X", "a text"]),
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_loads_a_model_takes_it_positionally_or_with_m(command: str) -> None:
    positional, flag = MODEL_COMMANDS[command]
    for argv in filter(None, (positional, flag)):
        args = parsed(argv)
        assert args.model == "X", argv
        assert not {"model_flag", "model_positional", "model_into"} & set(vars(args))
    assert parsed(flag[:1] + flag[3:] if flag[1] in ("-m", "--model") else flag).model is None


def test_eval_and_pretrain_name_models_the_same_way() -> None:
    assert parsed(["eval", "a", "-m", "b", "--model", "c", "--task", "perplexity", "--data", "t"]).models == [
        "a"
    ]
    assert parsed(["eval", "a", "-m", "b", "--task", "perplexity", "--data", "t"]).model_flags == ["b"]
    # pretrain: MODEL (or --init, its YAML key) is a model to continue; a new model's architecture is --arch
    assert parsed(["pretrain", "X", "--data", "d"]).init == "X"
    assert parsed(["pretrain", "--init", "X", "--data", "d"]).init == "X"
    args = parsed(["pretrain", "--arch", "tiny-llama", "--data", "d", "--out", "r"])
    assert (args.arch, args.init, vars(args)["train.out_dir"]) == ("tiny-llama", None, "r")


def test_two_different_models_are_one_line_exit_2(capsys) -> None:
    assert main(["generate", "a", "-m", "b", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two models given: 'a' and 'b'" in err and "-m/--model" in err
    assert parsed(["generate", "a", "-m", "a", "-p", "hi"]).model == "a"  # the same one twice is fine


@pytest.mark.parametrize(
    ("argv", "old", "dest", "value"),
    [
        (["pretrain", "--model", "tiny-llama", "--data", "d"], "--model", "arch", "tiny-llama"),
        (["pretrain", "--data", "d", "--out-dir", "r"], "--out-dir", "train.out_dir", "r"),
        (["finetune", "--data", "d", "--out-dir", "r"], "--out-dir", "train.out_dir", "r"),
        (["export", "--out-dir", "o"], "--out-dir", "out", "o"),
        (["eval", "--task", "perplexity", "--data", "t", "--out-dir", "o"], "--out-dir", "out", "o"),
    ],
)
def test_old_spellings_work_with_one_deprecation_line(argv, old, dest, value, capsys) -> None:
    assert vars(parsed(argv))[dest] == value
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {old} is deprecated, use --")


def _shards(tmp_path: Path, tokenizer_folder: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(SAMPLE_TEXT * 20), encoding="utf-8")
    prepare_corpus([corpus], LLM.load(tokenizer_folder).tokenizer, tmp_path / "shards", val_fraction=0.1)
    return tmp_path / "shards"


def test_pretrain_old_and_new_spellings_train_the_same_model(
    tmp_path: Path, tiny_folder: Path, capsys
) -> None:
    shards = _shards(tmp_path, tiny_folder)
    common = ["--data", str(shards), "--max-steps", "2", "--micro-batch-size", "2", "--block-size", "16"]
    common += ["--eval-every", "0", "--no-progress", "--warmup-steps", "4"]
    assert main(["pretrain", "--model", "tiny-llama", "--out-dir", str(tmp_path / "old"), *common]) == 0
    old_err = capsys.readouterr().err
    assert main(["pretrain", "--arch", "tiny-llama", "--out", str(tmp_path / "new"), *common]) == 0
    new_err = capsys.readouterr().err
    assert "--model is deprecated, use --arch" in old_err and "--out-dir is deprecated, use --out" in old_err
    assert "deprecated" not in new_err
    # warmup (4) >= max steps (2): said once, in the flags' words
    warned = [line for line in new_err.splitlines() if "--warmup-steps 4 is not below --max-steps 2" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "50% of its peak" in warned[0]
    old, new = (LLM.load(tmp_path / run / "model").model.state_dict() for run in ("old", "new"))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_warmup_note_matches_the_schedule() -> None:
    assert warmup_note(100, 1000) is None and warmup_note(0, 5) is None
    # the schedule's last step (2 of 0..2) at warmup 6 reaches 3/6 of the peak, as the note says
    assert learning_rate(2, lr=1.0, min_lr=0.1, warmup=6, total=3, decay="cosine") == 0.5
    assert "reaching 50% of its peak" in warmup_note(6, 3)
    assert "reaching 100% of its peak" in warmup_note(5, 5)


def _recording_summarize(monkeypatch) -> list[tuple[str, str]]:
    """LLM.summarize, recording (model source, text) of each call."""
    calls: list[tuple[str, str]] = []

    def recording(self, text, **options):
        calls.append((self.source, text))
        return f"summary of {text[:10]}"

    monkeypatch.setattr(LLM, "summarize", recording)
    return calls


def test_summarize_takes_texts_positionally_or_from_a_file(
    monkeypatch, tmp_path, tiny_folder, capsys
) -> None:
    calls = _recording_summarize(monkeypatch)
    assert main(["summarize", "-m", str(tiny_folder), "some text", "长城是中国古代的军事防御工程"]) == 0
    assert [text for _, text in calls] == ["some text", "长城是中国古代的军事防御工程"]
    out, err = capsys.readouterr()
    assert out == "summary of some text\n\nsummary of 长城是中国古代的军事\n" and "deprecated" not in err
    article = tmp_path / "article.txt"
    article.write_text("第一段。\n\n第二段。\n", encoding="utf-8")
    assert main(["summarize", "--model", str(tiny_folder), "--file", str(article)]) == 0
    assert calls[-1][1] == "第一段。\n\n第二段。\n"  # a file is one text


def test_summarize_old_spelling_model_positional_still_works(
    monkeypatch, tmp_path, tiny_folder, capsys
) -> None:
    calls = _recording_summarize(monkeypatch)
    article = tmp_path / "article.txt"
    article.write_text("a long article", encoding="utf-8")
    assert main(["summarize", str(tiny_folder), "--file", str(article)]) == 0
    assert calls == [(str(tiny_folder), "a long article")]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summarize MODEL is deprecated, use summarize -m" in err


def test_texts_and_file_together_or_empty_are_one_line_errors(tmp_path, tiny_folder, capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("x\n", encoding="utf-8")
    for command in ("classify", "embed", "summarize"):
        assert main([command, "-m", str(tiny_folder), "a text", "--file", str(texts)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "both as arguments and with --file" in err
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    assert (
        main(["classify", "-m", str(tiny_folder), "--labels", "a,b", "--file", str(tmp_path / "blank.txt")])
        == 2
    )
    assert "no text to classify" in capsys.readouterr().err


def test_classify_and_embed_read_one_text_per_line_of_a_file(tmp_path, tiny_folder, capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("你好\n\nhello world\n", encoding="utf-8")
    assert main(["classify", "-m", str(tiny_folder), "--labels", "正面,负面", "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[-1] for line in lines] == ["你好", "hello world"]
    assert all(line.split("\t")[0] in ("正面", "负面") for line in lines)
    assert main(["embed", "-m", str(tiny_folder), "--file", str(texts)]) == 0
    assert capsys.readouterr().out.count('"embedding"') == 2


def test_generate_and_chat_print_tokens_per_second_unless_quiet(monkeypatch, tiny_folder, capsys) -> None:
    argv = ["generate", str(tiny_folder), "-p", "hello", "--max-tokens", "3", "--stop", "\x00"]
    monkeypatch.setattr(LLM, "stream", lambda self, prompt, **options: iter(["a b", " c"]))
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "helloa b c\n"
    tokens = len(LLM.load(tiny_folder).tokenizer.encode("a b c", add_special_tokens=False))
    assert err.startswith(f"[{tokens} tokens in ") and err.rstrip().endswith("tokens/s]")
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    lines = iter(["hi", "你好", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(tiny_folder)]) == 0
    assert capsys.readouterr().err.count("tokens/s]") == 2
    lines = iter(["hi", ""])
    assert main(["chat", "-m", str(tiny_folder), "--quiet"]) == 0
    assert "tokens/s" not in capsys.readouterr().err


def test_quickstart_no_pretrain_skips_the_training_tour(monkeypatch, tiny_folder, capsys) -> None:
    assert build_parser().parse_args(["quickstart"]).pretrain is True
    tiny = LLM.load(tiny_folder)
    monkeypatch.setattr(quickstart.LLM, "load", lambda **options: tiny)

    def no_training(*args):
        raise AssertionError("--no-pretrain trained")

    monkeypatch.setattr(quickstart, "pretrain_demo", no_training)
    assert main(["quickstart", "--no-pretrain", "--max-tokens", "2"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def _switch(action: argparse.Action) -> bool:
    """A flag that is off unless given (store_true and the like): its default needs no words."""
    return action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)


def test_every_flag_has_help_that_says_its_default() -> None:
    """...or that it is required (export --out is checked by the command, for its old spelling's sake)."""
    missing = []
    root = build_parser()
    for parser in cli._parsers_under(root):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction | cli._VersionAction):
                continue
            shown = formatter._expand_help(action) if action.help else ""
            said = "required" in shown if action.required or "(required" in shown else "default" in shown
            if not shown.strip() or not (_switch(action) or said):
                missing.append(f"{parser.prog} {action.option_strings[-1]}: {shown!r}")
    assert not missing, "\n".join(missing)
    # the defaults shown are the real ones
    generate = cli._parsers_under(root)
    parsers = {p.prog: p for p in generate}
    assert "(default: 8000)" in parsers["lmforge serve"].format_help()
    assert "(default: off, eager)" in parsers["lmforge generate"].format_help()
    assert "(default: False)" not in "".join(p.format_help() for p in parsers.values())


def test_a_yaml_model_key_is_the_old_name_of_arch(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny-llama\ndata: shards\n", encoding="utf-8")
    settings, given = cli._settings(parsed(["pretrain", "--config", str(config)]), PretrainSettings)
    assert "arch" in given  # a YAML key counts as given, under its new name
    assert settings.arch == "tiny-llama" and settings.init is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model is deprecated, use arch" in err
