"""Prompts, in English or Chinese by the text's script: the words that turn a classification, a summary or a
multiple-choice question into text for a language model. One place, so fine-tuning data (``lmforge.data``)
and inference (``lmforge.inference``, ``lmforge.evaluate``) ask the model the same question.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.tokenizer import Tokenizer

Example = tuple[str, str]  # (text, label) or (text, summary)


def is_chinese(text: str) -> bool:
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    return cjk > 0.2 * max(1, len(text.strip()))


def chat_or_plain(tokenizer: Tokenizer, user: str, answer_prefix: str = "") -> str:
    """The prompt text for a user message: the model's chat template when it has one, else plain text."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": user}]) + answer_prefix
    return plain_prompt(user, answer_prefix)


def plain_prompt(user: str, answer_prefix: str = "") -> str:
    """The prompt text for a model without a chat template (a hosted one's too: ``lmforge.hosted``)."""
    return user + "\n" + answer_prefix


def classification_prompt(text: str, labels: Sequence[str], examples: Sequence[Example] = ()) -> str:
    if is_chinese(text):
        lines = [f"请把文本归入以下类别之一：{'、'.join(labels)}。只回答类别。"]
        lines += [f"\n文本：{t}\n类别：{label}" for t, label in examples]
        lines.append(f"\n文本：{text}\n类别：")
    else:
        lines = [
            f"Classify the text into one of these categories: {', '.join(labels)}. Answer with the category only."
        ]
        lines += [f"\nText: {t}\nCategory: {label}" for t, label in examples]
        lines.append(f"\nText: {text}\nCategory:")
    return "\n".join(lines)


def summarization_prompt(text: str, examples: Sequence[Example] = ()) -> str:
    if is_chinese(text):
        shots = "".join(f"文本：{t}\n摘要：{s}\n\n" for t, s in examples)
        return f"{shots}请用一句话概括下面文本的主要内容。\n\n文本：{text}\n摘要："
    shots = "".join(f"Text: {t}\nSummary: {s}\n\n" for t, s in examples)
    return f"{shots}Summarize the following text in one or two sentences.\n\nText: {text}\nSummary:"


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    letters = "ABCDEFGH"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    answer = "答案：" if is_chinese(question) else "Answer:"
    return f"{question}\n{options}\n{answer}"
