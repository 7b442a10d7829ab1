"""Explanations: token probabilities (characters whole, top-1 = greedy), attention weights against transformers'
eager attention, integrated gradients' completeness, the logit lens, and the figures and command lines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge import LLM
from lmforge.cli import main
from lmforge.explain import attribute, render
from lmforge.explain.attribution import MAX_STEPS
from lmforge.explain.tokens import TokenExplanation, piece_spans, token_text
from lmforge.model import recording_attention

from .conftest import SAMPLE_TEXT, tiny_llm

ZH_PROMPT = "床前明月光，疑是地上霜。"


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer) -> LLM:
    return tiny_llm("tiny-llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_tokenizer) -> LLM:
    return tiny_llm("tiny-gpt2", tiny_tokenizer, seed=3, labels=["ham", "spam"], block_size=512)


def _check_greedy(llm: LLM, prompt, max_new_tokens: int) -> TokenExplanation:
    explanation = llm.explain_generation(prompt, max_new_tokens=max_new_tokens)
    steps = explanation.steps
    assert steps, "nothing was generated"
    for step in steps:
        assert step.alternatives[0].token_id == step.token_id
        assert step.rank == 1
        assert step.alternatives[0].probability == pytest.approx(step.probability)
        assert 0 < step.probability <= 1 and step.entropy >= 0
    for piece in explanation.tokens:
        assert "\ufffd" not in piece.text
        assert all("\ufffd" not in a.text for a in piece.alternatives)
    # the same tokens as the ordinary generation, and the pieces spell its text
    expected = llm.complete([prompt], max_new_tokens=max_new_tokens)[0]
    assert [s.token_id for s in steps] == expected.token_ids
    assert "".join(p.text for p in explanation.tokens) == explanation.text
    assert "\ufffd" not in explanation.text
    if "\ufffd" not in expected.text:  # a random model writes invalid UTF-8 too: shown as its bytes
        assert explanation.text == expected.text
    return explanation


@pytest.mark.parametrize("prompt", ["The quick brown", ZH_PROMPT, "我们今天去北京吃烤鸭 🦆"])
def test_greedy_top1_is_the_chosen_token_and_no_broken_character_tiny(tiny, prompt, one_thread) -> None:
    _check_greedy(tiny, prompt, 24)


def test_greedy_smollm2_chinese(smollm2, one_thread) -> None:
    prompt = [{"role": "user", "content": "用中文介绍一下北京。"}]
    explanation = _check_greedy(smollm2, prompt, 12)
    assert any(len(piece.steps) > 1 for piece in explanation.tokens), "no character took several tokens"


def test_byte_tokens_of_a_character_are_grouped(smollm2, one_thread) -> None:
    ids = smollm2.tokenizer.encode("鸭🦆", add_special_tokens=False)
    spans = piece_spans(smollm2.tokenizer, ids)
    assert [text for _, _, text in spans] == ["鸭", "🦆"]
    assert spans[-1][1] == len(ids) and len(ids) > 2
    # a lone byte token shows as its bytes, never U+FFFD
    assert token_text(smollm2.tokenizer, ids[0]).startswith("\\x")


def test_sampling_options_and_scored_text(tiny, one_thread) -> None:
    sampled = tiny.explain_generation("The", max_new_tokens=6, temperature=1.0, seed=5, alternatives=3)
    again = tiny.explain_generation("The", max_new_tokens=6, temperature=1.0, seed=5, alternatives=3)
    assert [s.token_id for s in sampled.steps] == [s.token_id for s in again.steps]
    assert all(len(s.alternatives) == 3 for s in sampled.steps)
    scored = tiny.explain_text(SAMPLE_TEXT[2])
    assert "".join(p.text for p in scored.tokens) == SAMPLE_TEXT[2][len(scored.prompt) :]
    ids = tiny.tokenizer.encode(SAMPLE_TEXT[2])
    logits, _ = tiny.model(torch.tensor([ids]))
    expected = logits[0, 0].softmax(-1)[ids[1]].item()
    assert scored.steps[0].probability == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ attention
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_attention_equals_transformers_eager(preset, tiny_tokenizer, tmp_path, one_thread) -> None:
    llm = tiny_llm(preset, tiny_tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(
        llm.save(tmp_path / preset), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    text = SAMPLE_TEXT[0] + " " + SAMPLE_TEXT[3]
    maps = llm.explain_attention(text)
    with torch.no_grad():
        theirs = torch.stack(
            [a[0] for a in hf(torch.tensor([maps.token_ids]), output_attentions=True).attentions]
        )
    assert maps.weights.shape == (
        llm.config.n_layer,
        llm.config.n_head,
        len(maps.token_ids),
        len(maps.token_ids),
    )
    assert (maps.weights - theirs).abs().max().item() <= 1e-5
    rollout = maps.rollout()
    assert torch.allclose(rollout.sum(-1), torch.ones(len(maps.token_ids)), atol=1e-5)
    assert rollout.triu(1).abs().max() == 0  # causal: nothing flows from later tokens


def test_recording_attention_leaves_the_outputs_and_the_normal_path_alone(tiny, one_thread) -> None:
    ids = torch.tensor([tiny.tokenizer.encode(SAMPLE_TEXT[1])])
    with torch.no_grad():
        plain, _ = tiny.model(ids)
        with recording_attention() as records:
            recorded, _ = tiny.model(ids)
            assert len(records) == tiny.config.n_layer
            # another thread's forward on the same model (a server's scheduler) neither records nor changes
            elsewhere = ThreadPoolExecutor(1).submit(lambda: tiny.model(ids)[0]).result()
            assert len(records) == tiny.config.n_layer
        tiny.model(ids)  # after the block: nothing more recorded
    assert len(records) == tiny.config.n_layer
    assert (plain - recorded).abs().max().item() <= 1e-5
    assert torch.equal(plain, elsewhere)


def test_explanations_in_threads_beside_generation_equal_their_solo_runs(tiny, one_thread) -> None:
    """A server explains in task threads while its scheduler decodes on the same model: every explanation
    (attention maps, the logit lens, attributions) and every generation must come out as it does alone."""
    texts = [ZH_PROMPT, SAMPLE_TEXT[1], "我们今天去北京吃烤鸭 🦆"]
    jobs = {
        **{("attention", t): lambda t=t: tiny.explain_attention(t).weights for t in texts},
        **{("lens", t): lambda t=t: tiny.logit_lens(t, top_k=3).to_dict() for t in texts},
        **{
            ("attribute", t): lambda t=t: attribute(tiny, t, kind="next_token", steps=8).to_dict()
            for t in texts[:2]
        },
        **{
            ("rollout", t): lambda t=t: attribute(
                tiny, t, kind="next_token", method="attention_rollout"
            ).to_dict()
            for t in texts[:2]
        },
        **{("generate", t): lambda t=t: tiny.complete([t], max_new_tokens=16)[0].token_ids for t in texts},
    }
    solo = {name: job() for name, job in jobs.items()}
    rounds = 4
    with ThreadPoolExecutor(4) as pool:
        runs = [(name, pool.submit(job)) for _ in range(rounds) for name, job in jobs.items()]
        for name, run in runs:
            got, want = run.result(), solo[name]
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want), name
            else:
                assert got == want, name


def test_attention_of_the_sentence_encoder(tiny_tokenizer, one_thread) -> None:
    from lmforge import Config
    from lmforge.encoder import Encoder

    torch.manual_seed(0)
    config = Config.from_name("tiny-gpt2", model_type="bert", type_vocab_size=2)
    llm = LLM(Encoder(config), tiny_tokenizer)
    maps = llm.explain_attention(SAMPLE_TEXT[0])
    T = len(maps.token_ids)
    assert maps.weights.shape[-2:] == (T, T)
    assert maps.weights[..., -1, :].min() > 0  # bidirectional: the last token sees the first


def test_chinese_heatmap_png(smollm2, tmp_path, one_thread) -> None:
    maps = smollm2.explain_attention(ZH_PROMPT)
    assert all("\ufffd" not in label for label in maps.labels)
    head = render.attention_png(maps, tmp_path / "head.png", layer=3, head=2)
    assert head.stat().st_size > 10_000


# ------------------------------------------------------------------ attributions
@pytest.mark.parametrize("text", [SAMPLE_TEXT[0], SAMPLE_TEXT[2], SAMPLE_TEXT[3]])
def test_integrated_gradients_completeness_head(tiny_classifier, text, one_thread) -> None:
    attribution = tiny_classifier.explain_classification(text)
    assert attribution.completeness_error < 0.01
    assert sum(attribution.scores) == pytest.approx(attribution.score - attribution.baseline_score, rel=0.01)
    assert "".join(attribution.pieces) == text
    probs = tiny_classifier.classify_text(text)["probabilities"]
    assert attribution.score == pytest.approx(
        torch.tensor(probs[attribution.target]).logit().item(), abs=1e-4
    )  # log-odds of the predicted label


def test_integrated_gradients_completeness_zero_shot_and_next_token(tiny, one_thread) -> None:
    for text in (SAMPLE_TEXT[1], SAMPLE_TEXT[2]):
        zero_shot = tiny.explain_classification(text, ["ham", "spam"])
        assert zero_shot.completeness_error < 0.01
        assert "".join(zero_shot.pieces) == text  # the text's tokens only, not the prompt's
        next_token = tiny.explain_next_token(text)
        assert next_token.completeness_error < 0.01


def test_occlusion_and_gradient_x_input(tiny_classifier, one_thread) -> None:
    text = SAMPLE_TEXT[1]
    occlusion = tiny_classifier.explain_classification(text, method="occlusion", baseline="zeros")
    ids = tiny_classifier.tokenizer.encode(text)
    with torch.no_grad():
        embeds = tiny_classifier.model.wte(torch.tensor([ids]))
        embeds[0, 0] = 0
        hook = tiny_classifier.model.wte.register_forward_hook(lambda *_: embeds)
        try:
            scores = tiny_classifier.model.classify(torch.tensor([ids]))[0]
        finally:
            hook.remove()
    index = tiny_classifier.config.labels.index(occlusion.target)
    occluded = (scores[index] - scores[1 - index]).item()
    assert occlusion.scores[0] == pytest.approx(occlusion.score - occluded, abs=1e-5)
    gxi = tiny_classifier.explain_classification(text, method="gradient_x_input")
    assert len(gxi.scores) == len(occlusion.scores) and any(s != 0 for s in gxi.scores)
    rollout = tiny_classifier.explain_classification(text, method="attention_rollout")
    assert sum(rollout.scores) == pytest.approx(1.0, abs=1e-4)


def test_adaptive_integrated_gradients_refine_until_the_tolerance(tiny_classifier, one_thread) -> None:
    text = SAMPLE_TEXT[3]
    fine = tiny_classifier.explain_classification(text, steps=256)  # one piece, 256 nodes: the reference
    assert fine.steps == 256 and fine.completeness_error < 1e-4
    strict = attribute(tiny_classifier, text, tolerance=1e-6)
    assert strict.steps > 32, "a tolerance the first pieces miss must make the rule halve some"
    assert strict.completeness_error <= 1e-6 or strict.steps > MAX_STEPS - 8
    # the pieces' integrals add up to the same attributions as the single fine integral
    assert strict.scores == pytest.approx(fine.scores, abs=1e-3 * max(map(abs, fine.scores)))
    default = tiny_classifier.explain_classification(text)
    assert default.steps == 32 and default.completeness_error < 0.01  # a smooth path: no refinement needed
    zeros = tiny_classifier.explain_classification(text, baseline="zeros")
    assert zeros.baseline_score != default.baseline_score and zeros.completeness_error < 0.01


def test_attributions_of_an_encoder_classifier(one_thread) -> None:
    from lmforge import Config
    from lmforge.encoder import Encoder
    from lmforge.errors import LmforgeError
    from lmforge.loading import EMBEDDING_MODEL, bundled_model_path
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(bundled_model_path(EMBEDDING_MODEL))  # MiniLM's: it adds [CLS] and [SEP]
    torch.manual_seed(0)
    text = "Claim your FREE prize 恭喜中奖"
    ids = tokenizer.encode(text)
    for pooling in ("mean", "cls"):
        config = Config.from_name(
            "bert-tiny", vocab_size=tokenizer.vocab_size, labels=["ham", "spam"], pooling=pooling
        )
        llm = LLM(Encoder(config).eval(), tokenizer)
        ig = llm.explain_classification(text, label="spam")
        assert ig.completeness_error < 0.01
        assert len(ig.pieces) == len(ids) - 2 and not any("[CLS]" in p or "[SEP]" in p for p in ig.pieces)
        words = [w for w, _ in ig.words()]  # MiniLM's vocabulary lacks some characters: [UNK]
        assert words[:4] == ["claim", "your", "free", "prize"] and len(words) == 8 and "中" in words
        probs = llm.classify_text(text)["probabilities"]
        assert ig.score == pytest.approx(torch.tensor(probs["spam"]).logit().item(), abs=1e-4)
        occlusion = llm.explain_classification(text, method="occlusion", label="spam")
        assert len(occlusion.scores) == len(ig.scores) and any(s != 0 for s in occlusion.scores)
        rollout = llm.explain_classification(text, method="attention_rollout", label="spam")
        rolled = llm.explain_attention(text).rollout()
        read = rolled.mean(0) if pooling == "mean" else rolled[0]  # where the head reads
        assert rollout.scores == pytest.approx(read[1:-1].tolist(), abs=1e-5)
    with pytest.raises(LmforgeError, match="sentence encoder"):
        llm.explain_classification(text, ["ham", "spam"], zero_shot=True)


def test_integrated_gradients_on_the_real_minilm_are_complete_at_the_default(one_thread) -> None:
    """The bundled all-MiniLM-L6-v2 with a classification head (seeded, untrained: the path's shape is the
    encoder's): the default integrated gradients close to 1 % (SmolLM2's figures: explain/attribution.py)."""
    from lmforge.loading import EMBEDDING_MODEL
    from lmforge.train.methods import add_classifier

    llm = LLM.load(EMBEDDING_MODEL, dtype="float32", device="cpu")
    add_classifier(llm.model, ["ham", "spam"], regression=False, seed=0)
    attribution = llm.explain_classification("URGENT! You have won a FREE prize, 恭喜您中奖了", label="spam")
    assert attribution.completeness_error <= 0.01 and attribution.steps >= 32
    delta = attribution.score - attribution.baseline_score
    assert sum(attribution.scores) == pytest.approx(delta, rel=0.01)


def test_bad_requests_are_errors_that_say_the_fix(tiny, tiny_classifier) -> None:
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="unknown attribution method"):
        tiny_classifier.explain_classification("hi", method="magic")
    with pytest.raises(LmforgeError, match="steps"):
        tiny_classifier.explain_classification("hi", steps=0)
    with pytest.raises(LmforgeError, match="not one of the head's labels"):
        tiny_classifier.explain_classification("hi", label="eggs")
    with pytest.raises(LmforgeError, match="alternatives"):
        tiny.explain_generation("hi", alternatives=0)
    with pytest.raises(LmforgeError, match="candidate labels"):
        tiny.explain_classification("hi")


# ------------------------------------------------------------------ logit lens
def test_logit_lens_last_block_is_the_model_prediction(tiny, tmp_path, one_thread) -> None:
    lens = tiny.logit_lens(SAMPLE_TEXT[2], top_k=2)
    ids = tiny.tokenizer.encode(SAMPLE_TEXT[2])
    assert len(lens.rows) == tiny.config.n_layer + 1 and len(lens.labels) == len(ids)
    logits, _ = tiny.model(torch.tensor([ids]))
    best = logits[0].softmax(-1).max(-1)
    for t in range(len(ids)):
        assert lens.rows[-1].top[t][0][0] == token_text(tiny.tokenizer, int(best.indices[t]))
        assert lens.rows[-1].top[t][0][1] == pytest.approx(best.values[t].item(), rel=1e-5)
    assert render.lens_png(lens, tmp_path / "lens.png").stat().st_size > 5_000
    assert "layer" in render.lens_table(lens)


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def folders(tiny, tiny_classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    return tiny.save(root / "lm"), tiny_classifier.save(root / "classifier")


def test_generate_explain_and_logit_lens_cli(folders, tmp_path, capsys) -> None:
    lm, _ = folders
    assert main(["generate", str(lm), "-p", ZH_PROMPT, "--explain", "--max-tokens", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "alternatives" in out and "\x1b[" not in out  # plain when not a terminal
    assert "\ufffd" not in out
    assert (
        main(["generate", str(lm), "-p", "hello", "--logit-lens", "--out", str(tmp_path / "lens.png")]) == 0
    )
    assert "layer" in capsys.readouterr().out and (tmp_path / "lens.png").is_file()


def test_classify_explain_cli(folders, tmp_path, capsys) -> None:
    _, classifier = folders
    html_file = tmp_path / "why.html"
    assert (
        main(["classify", "-m", str(classifier), "--explain", "--out", str(html_file), SAMPLE_TEXT[2]]) == 0
    )
    out = capsys.readouterr().out
    assert "integrated_gradients" in out and "completeness error" in out
    page = html_file.read_text(encoding="utf-8")
    assert "<span" in page and "明月" in page
    assert main(["classify", "-m", str(classifier), "--out", str(html_file), "hi"]) == 2
    assert "--explain" in capsys.readouterr().err


def test_eval_explains_the_most_confident_errors(folders, tmp_path) -> None:
    import json

    from lmforge.recipes.evaluate import evaluate_models

    from .conftest import TEST_DATA

    _, classifier = folders
    report = evaluate_models(
        [str(classifier)], TEST_DATA / "sms_spam" / "test.jsonl", task="classify", out_dir=tmp_path, limit=8,
        explain=1,
    )  # fmt: skip
    errors = report["explained_errors"][str(classifier)]
    assert len(errors) == 1  # a random head gets some of 8 wrong
    assert errors[0]["predicted"] != errors[0]["label"]
    assert errors[0]["attribution"]["completeness_error"] < 0.01
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["explained_errors"][str(classifier)][0]["text"] == errors[0]["text"]
    assert "Most confident errors" in (tmp_path / "report.md").read_text(encoding="utf-8")
