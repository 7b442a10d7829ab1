"""The pretraining path as a user drives it: tokenizer train -> data prepare -> pretrain -> generate, zh and en."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from lmforge import LLM, LmforgeError
from lmforge.cli import build_parser, main
from lmforge.recipes.pretrain import PretrainSettings, load_recipe
from lmforge.recipes.settings import load_yaml, settings_from

from .conftest import TEST_DATA
from .test_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def songci(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "songci.txt"
    text = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8")[:60_000]
    path.write_text(text, encoding="utf-8")
    return path


def test_chinese_bpe_pretraining_end_to_end(songci, tmp_path, capsys):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert main(["tokenizer", "train", str(songci), "--vocab-size", "800", "--out", str(tok)]) == 0
    args = ["data", "prepare", str(songci), "--tokenizer", str(tok), "--out", str(data), "--split-paragraphs"]
    assert main([*args, "--val-fraction", "0.05"]) == 0
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "arch: tiny-gpt2\n"
        "model_config: {n_layer: 2, n_embd: 64, n_head: 4, block_size: 64}\n"
        f"data: {data}\n"
        "train: {max_steps: 30, micro_batch_size: 8, lr: 0.003, warmup_steps: 3, eval_every: 15,"
        " eval_batches: 2, sample_prompt: '东风', progress: false}\n",
        encoding="utf-8",
    )
    assert main(["pretrain", "--config", str(yaml_file), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "done: 30 steps" in out
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(rows) == 30 and val[-1] < val[0]
    llm = LLM.load(run / "model")
    lineage = json.loads((run / "model" / "config.json").read_text())["lmforge"]["lineage"]
    assert lineage["recipe"] == "pretrain" and lineage["task"] == "language-modeling"
    # 30 steps teach little, but the model already writes mostly Chinese characters.
    text = llm.generate_text("东风", max_length=30, temperature=0.8, seed=1)
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 5


def test_continue_pretraining_smollm2_on_chinese_poetry(songci, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "prepare", str(songci), "--tokenizer", "default", "--out", str(data)]) == 0
    args = ["pretrain", "default", "--data", str(data), "--out", str(run), "--max-steps", "2"]
    args += ["--micro-batch-size", "2", "--block-size", "32", "--eval-every", "2", "--eval-batches", "1"]
    assert main([*args, "--lr", "1e-5", "--warmup-steps", "0", "--no-progress"]) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["lmforge"]["lineage"]["parent"].endswith(".gguf")
    assert LLM.load(run / "model").tokenizer.vocab_size == 49152


def test_pretrain_bad_input_is_one_line(tmp_path, songci):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(
        run_cli("tokenizer", "train", str(empty), "--vocab-size", "300", "--out", str(tmp_path))
    )
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {max_steps: [1,\n")
    assert_one_line_error(run_cli("pretrain", "--config", str(bad_yaml)), "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train: {max_stepz: 3}\n")
    assert_one_line_error(run_cli("pretrain", "--config", str(unknown), "--data", str(tmp_path)), "max_stepz")


def test_recipe_settings_are_the_yaml_file_with_the_given_flags_laid_over(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "arch: tiny-llama\nmodel_config: {n_layer: 2, n_embd: 64}\ndata: shards\n"
        "train: {max_steps: 30, lr: 1e-3, compile: true}\n",  # 1e-3 is a string to YAML 1.1
        encoding="utf-8",
    )
    args = build_parser().parse_args(
        ["pretrain", "--config", str(config), "--n-layer", "4", "--max-steps", "5"]
    )
    settings = settings_from(args, load_yaml(config), PretrainSettings, source=config)
    assert (settings.arch, settings.data, settings.model_config) == (
        "tiny-llama",
        "shards",
        {"n_layer": 4, "n_embd": 64},
    )
    assert (settings.train.max_steps, settings.train.lr, settings.train.compile) == (5, 1e-3, True)
    assert settings.train.micro_batch_size == 8  # neither file nor flag: the default
    assert load_recipe(config).train.max_steps == 30

    config.write_text("train: {max_steps: ten, precision: fp16}\nresume: maybe\n", encoding="utf-8")
    with pytest.raises(LmforgeError) as caught:
        load_recipe(config)
    message = str(caught.value)  # every problem at once
    assert "train.max_steps must be an integer, not 'ten'" in message
    assert "train.precision must be one of fp32, bf16, not 'fp16'" in message
    assert "resume must be true or false, not 'maybe'" in message


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_every_recipe_flag_says_what_it_does_by_default(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        if action.help != argparse.SUPPRESS and action.dest not in ("help", "config"):
            assert "(default: " in action.help, action.option_strings
