"""The playground shows why: clicking a word of an answer lists the tokens the model weighed there, with their
probabilities, and the attention view draws one layer's head over a text (headless Chromium through Playwright,
as tests/test_playground.py)."""

from __future__ import annotations

import shutil

import httpx
from playwright.sync_api import sync_playwright

from lmforge.serve import create_app

from .conftest import tiny_llm
from .serving import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# The page's fetch, with the answer to an attention request for layer 1, head 0 held back for 1.5 s.
DELAY_LAYER_1_HEAD_0 = """() => {
  const fetchNow = window.fetch;
  window.fetch = async (url, options) => {
    const response = await fetchNow(url, options);
    const asked = options && options.body ? JSON.parse(options.body) : {};
    if (String(url).endsWith("/v1/explain/attention") && asked.layer === 1 && asked.head === 0) {
      window.heldBack = "held";
      await new Promise((done) => setTimeout(done, 1500));
      setTimeout(() => { window.heldBack = "answered"; }, 200);  // after the page has handled it
    }
    return response;
  };
}"""


def test_clicking_a_generated_token_shows_its_alternatives(tiny_tokenizer, one_thread) -> None:
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with serving(create_app(llm)) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760}, locale="en-US")
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#model-info').textContent.includes('llama')")
            page.fill("#max-tokens", "12")
            page.eval_on_selector(
                "#temperature", "el => { el.value = 0; el.dispatchEvent(new Event('input')); }"
            )
            page.fill("#prompt", "床前明月光")
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant .token")
            page.wait_for_selector(".content.streaming", state="detached", timeout=60_000)
            tokens = page.locator(".message.assistant .token")
            assert tokens.count() >= 1
            answer = page.locator(".message.assistant .content").last.text_content()
            assert "".join(tokens.all_text_contents()) == answer
            tokens.first.click()
            panel = page.locator("#alternatives")
            panel.locator("li").first.wait_for()
            items = panel.locator("ol").first.locator("li")
            assert items.count() == 5
            assert "%" in items.first.inner_text()
            # greedy: the likeliest alternative is the token chosen, marked as such
            assert "chosen" in (items.first.get_attribute("class") or "")
            chosen = panel.locator(".alt-chosen").first.inner_text()
            assert chosen.rsplit(" ", 1)[0] == items.first.inner_text().rsplit(" ", 1)[0]
            page.click("button[data-lang=zh]")
            assert page.locator("h2[data-i18n=alternatives]").inner_text() == "候选词"
        finally:
            browser.close()


def test_the_attention_view_draws_one_head_over_a_chinese_text(tiny_tokenizer, one_thread) -> None:
    llm = tiny_llm("tiny-llama", tiny_tokenizer, block_size=512)  # room for a text over the view's limit
    text = "床前明月光，烤鸭🦆"  # the tiny tokenizer splits 烤鸭 and the duck into byte tokens
    labels = llm.explain_attention(text).labels
    with serving(create_app(llm)) as base, sync_playwright() as p:
        # bad requests: one OpenAI-style line naming the fix
        bad = httpx.post(f"{base}/v1/explain/attention", json={"input": text, "head": 99})
        assert bad.status_code == 400 and "head 0-" in bad.json()["error"]["message"]
        long = httpx.post(f"{base}/v1/explain/attention", json={"input": "月" * 200})
        assert long.status_code == 400 and "limit of 128" in long.json()["error"]["message"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760}, locale="zh-CN")
            page.goto(base + "/")
            page.click("#attention-open")
            page.fill("#attention-text", text)
            page.click("#attention-show")
            grid = page.locator("#attention-map .heatmap-grid")
            grid.wait_for()
            assert grid.locator(".cell").count() == len(labels) ** 2
            assert grid.locator(".col-label").all_text_contents() == labels  # whole characters, none broken
            assert "🦆[1/2]" in labels and all("\ufffd" not in label for label in labels)
            # causal: the first token looks at itself only (full colour), at the next token not at all
            cells = grid.locator(".cell")
            assert "rgb(37, 99, 235)" in (cells.nth(0).get_attribute("style") or "")
            assert "rgba(37, 99, 235, 0)" in (cells.nth(1).get_attribute("style") or "")
            # layer 1, then head 2: two requests; the first one's answer (layer 1, head 0) is held back so
            # it arrives last, and the view still shows what was asked for last
            page.evaluate(DELAY_LAYER_1_HEAD_0)
            page.select_option("#attention-layer", "1")
            page.select_option("#attention-head", "2")
            shown = "document.querySelector('#attention-map .hint').textContent"
            page.wait_for_function(f"{shown}.endsWith(' 1 · 头 2')")
            page.wait_for_function("window.heldBack === 'answered'")
            assert page.evaluate(shown).endswith(" 1 · 头 2")
            assert page.input_value("#attention-head") == "2" and page.input_value("#attention-layer") == "1"
            assert page.text_content("#attention-error") == ""
            assert page.locator("#attention-layer option").count() == llm.config.n_layer
        finally:
            browser.close()
