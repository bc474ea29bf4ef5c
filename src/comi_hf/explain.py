"""Render what COMI kept of a context as an HTML page.

COMI is soft compression: the memory vectors cannot be read back as text. What can be shown is
how the context was cut and weighted: each memory vector fuses a run of consecutive tokens (its
group, sized by the coarse stage) with MIG weights (the fine stage). The page shades every
token by its weight relative to the heaviest token of its group and outlines every group;
groups the coarse stage shrank (compressed less than the merge size) are outlined in blue,
groups it grew in grey.
"""

from __future__ import annotations

import html

__all__ = ["render_compression_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; line-height: 2.1; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; }
.meta { color: #555; line-height: 1.5; }
.group { border: 1.5px solid #999; border-radius: 4px; padding: 2px 1px; margin: 0 1px; }
.group.kept { border-color: #1f6fd1; }
.tok { border-radius: 2px; white-space: pre-wrap; }
.legend span { padding: 0 .4em; margin-right: 1em; }
"""


def _token_html(text: str, weight: float, relative: float, memory: int) -> str:
    return (
        f'<span class="tok" data-memory="{memory}" data-weight="{weight:.6f}" '
        f'style="background-color: rgba(230, 85, 13, {relative:.3f})" '
        f'title="weight {weight:.4f}">{html.escape(text)}</span>'
    )


def _section(compression: dict, question: str | None, answer: str | None, merge_size: int | None) -> str:
    tokens, groups = compression["tokens"], compression["groups"]
    parts = []
    if question is not None:
        parts.append(f"<h2>Q: {html.escape(question)}</h2>")
    if answer is not None:
        parts.append(f'<p class="meta">Answer: <b>{html.escape(answer)}</b></p>')
    ratio = len(tokens) / max(1, len(groups))
    parts.append(
        f'<p class="meta">{len(tokens)} context tokens → {len(groups)} memory vectors ({ratio:.1f}× compression'
        + (f", merge size {merge_size}" if merge_size else "")
        + ")</p><p>"
    )
    for memory, group in enumerate(groups):
        start, end, weights = group["start"], group["end"], group["weights"]
        size = end - start
        kept = merge_size is not None and size < merge_size
        heaviest = max(weights) if weights else 1.0
        label = f"memory {memory}: tokens {start}–{end - 1} ({size} tokens"
        label += f", budget {size}/{merge_size})" if merge_size else ")"
        inner = "".join(
            _token_html(tokens[start + offset], weight, weight / heaviest if heaviest > 0 else 0.0, memory)
            for offset, weight in enumerate(weights)
        )
        css = "group kept" if kept else "group"
        parts.append(f'<span class="{css}" data-memory="{memory}" title="{html.escape(label)}">{inner}</span>')
    parts.append("</p>")
    return "\n".join(parts)


def render_compression_html(
    compressions: dict | list[dict],
    *,
    questions: str | list[str] | None = None,
    answers: str | list[str] | None = None,
    merge_size: int | None = None,
    title: str = "What COMI kept",
) -> str:
    """An HTML page showing how a context was compressed, one section per question.

    Args:
        compressions: the `compression` of a `comi-qa` pipeline result (or the `compressions`
            list of a several-questions result): `{"tokens": [...], "groups": [{"start", "end",
            "weights"}, ...]}`.
        questions, answers: shown above each section.
        merge_size: the merge size used, to show each group's budget.
        title: the page title.
    """
    compressions = [compressions] if isinstance(compressions, dict) else list(compressions)
    questions = [questions] if isinstance(questions, str) or questions is None else list(questions)
    answers = [answers] if isinstance(answers, str) or answers is None else list(answers)
    questions += [None] * (len(compressions) - len(questions))
    answers += [None] * (len(compressions) - len(answers))
    sections = [
        _section(compression, question, answer, merge_size)
        for compression, question, answer in zip(compressions, questions, answers, strict=False)
    ]
    legend = (
        '<p class="legend meta"><span style="background-color: rgba(230, 85, 13, 0.9)">heavy</span>'
        '<span style="background-color: rgba(230, 85, 13, 0.2)">light</span> token weight inside its group; '
        '<span class="group kept">blue outline</span> a group the coarse stage gave fewer tokens than the merge '
        'size (compressed less); <span class="group">grey outline</span> the others.</p>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{legend}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
