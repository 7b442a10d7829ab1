"""The playground shows why: clicking a word of an answer lists the tokens the model weighed there, with their
probabilities (headless Chromium through Playwright, as tests/test_playground.py)."""

from __future__ import annotations

import shutil

from playwright.sync_api import sync_playwright

from lmforge.serve import create_app

from .conftest import tiny_llm
from .serving import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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
