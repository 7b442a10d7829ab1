"""The web playground in headless Chromium (Debian's package, driven by Playwright): chat in Chinese and
English with streaming, and a screenshot for a person to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from lmforge.serve import create_app

from .serving import serving

SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "output" / "playground.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No skip when chromium is missing: `make install` puts it there, on CI too, and a skipped test checks nothing.


# Records the last answer's text at every change of the page: streaming shows as many growing versions,
# however fast the model is.
WATCH_ANSWERS = """() => {
  window.answerVersions = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll(".message.assistant .content");
    if (answers.length) window.answerVersions.push(answers[answers.length - 1].textContent);
  }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
}"""


def _send_and_watch(page, text: str) -> list[str]:
    """Send ``text``; return every version of the answer the page showed, the finished one last."""
    page.evaluate("() => { window.answerVersions = []; }")
    answers = page.locator(".message.assistant").count()
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant').length > {answers}")
    page.wait_for_selector(".content.streaming", state="detached", timeout=120_000)
    final = page.locator(".message.assistant .content").last.text_content()
    return [*page.evaluate("window.answerVersions"), final]


def test_playground_chats_in_chinese_and_english_with_streaming(smollm2):
    with serving(create_app(smollm2, batch_weights="packed")) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760}, locale="en-US")
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#model-info').textContent.includes('llama')")
            page.evaluate(WATCH_ANSWERS)
            assert page.locator("#send").inner_text() == "Send"
            page.fill("#max-tokens", "32")
            page.eval_on_selector(
                "#temperature", "el => { el.value = 0; el.dispatchEvent(new Event('input')); }"
            )
            page.fill("#system", "You are a helpful assistant.")

            for message in ("你好！请用中文介绍一下你自己。", "What is the capital of France?"):
                seen = _send_and_watch(page, message)
                final = seen[-1]
                assert final.strip(), f"no answer to {message!r}"
                assert "\ufffd" not in "".join(seen)
                # Streamed: the text was visible part-way and only grew from there.
                partial = [s for s in seen if 0 < len(s) < len(final)]
                assert partial, "the answer appeared all at once"
                assert all(final.startswith(s) for s in partial)
                if message.startswith("你好"):  # the first turn has no history: it must match the library
                    system = {"role": "system", "content": "You are a helpful assistant."}
                    user = {"role": "user", "content": message}
                    assert final == smollm2.chat([system, user], max_length=32)

            page.click("button[data-lang=zh]")
            assert page.locator("#send").inner_text() == "发送"
            assert "上下文" in page.locator("#model-info").inner_text()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
