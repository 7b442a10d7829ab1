"""SmolLM2's evaluation against transformers' own: the sliding-window perplexity recipe and log-likelihood scoring
of multiple choice. Apart from tests/test_evaluate.py because both run the real model twice (ours and transformers'),
so pytest-xdist can run them beside the rest."""

from __future__ import annotations

import json

import numpy as np
import torch

from lmforge.evaluate import choice_prompt, multiple_choice, perplexity

from .conftest import TEST_DATA, songci_next_verse_items


def _hf_sliding_window_nll(model, ids: list[int], window: int, stride: int) -> float:
    """transformers' documented perplexity recipe (docs: 'Perplexity of fixed-length models')."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + window, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == seq.size(1):
            break
    return nll_sum / n_tokens


def test_perplexity_matches_the_transformers_recipe(smollm2, hf_smollm2):
    hf_model, _ = hf_smollm2
    # Several windows of each text (the sliding-window recipe is what is compared): ~400 tokens of English and
    # ~1,100 of Chinese (a Chinese character is ~1.8 tokens of SmolLM2's), so 3 and 8 windows.
    for name, characters in (("tinyshakespeare.txt", 1500), ("luxun.txt", 600)):
        text = (TEST_DATA / "text" / name).read_text(encoding="utf-8")[:characters]
        ours = perplexity(smollm2, text, window=256, stride=128)
        ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
        theirs = np.exp(_hf_sliding_window_nll(hf_model, ids, 256, 128))
        assert abs(ours["perplexity"] - theirs) / theirs < 0.005, (name, ours, theirs)
        assert 0 < ours["bits_per_byte"] < 8


def _mc_items(name: str, n: int) -> list[dict]:
    with (TEST_DATA / name / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def test_multiple_choice_equals_transformers_log_likelihood(smollm2, hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    for name, items in (("mc_en", _mc_items("mc_en", 6)), ("songci_zh", songci_next_verse_items(6))):
        ours = multiple_choice(smollm2, items)
        predicted = []
        for item in items:
            prompt = hf_tokenizer(choice_prompt(item["question"], item["choices"])).input_ids
            scores = []
            for choice in item["choices"]:
                cont = hf_tokenizer(" " + str(choice)).input_ids
                with torch.no_grad():
                    logits = hf_model(torch.tensor([prompt + cont])).logits[0].float()
                logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
                scores.append(float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()) / len(cont))
            predicted.append(int(np.argmax(scores)))
        assert ours["predicted"] == predicted, name
