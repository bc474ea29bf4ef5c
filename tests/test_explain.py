from html.parser import HTMLParser

from comi_hf.explain import render_compression_html

COMPRESSION = {
    "tokens": ["the", " code", " <b>", " is", " 4", "8", "2", "1", " ."],
    "groups": [
        {"start": 0, "end": 2, "weights": [0.25, 0.75]},
        {"start": 2, "end": 7, "weights": [0.1, 0.1, 0.2, 0.3, 0.3]},
        {"start": 7, "end": 9, "weights": [0.5, 0.5]},
    ],
}


class _Collector(HTMLParser):
    """Checks nesting while collecting the token and group spans."""

    def __init__(self):
        super().__init__()
        self.stack, self.tokens, self.groups, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag not in ("meta", "br"):  # void elements
            self.stack.append(tag)
        if tag == "span" and attributes.get("class") == "tok":
            self.tokens.append(attributes)
        elif tag == "span" and attributes.get("class", "").startswith("group") and "data-memory" in attributes:
            self.groups.append(attributes)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "span":
            self.text.append(data)


def _parse(page):
    collector = _Collector()
    collector.feed(page)
    collector.close()
    assert not collector.stack, collector.stack
    return collector


def test_one_shaded_span_per_token_and_one_outline_per_group():
    page = render_compression_html(COMPRESSION, questions="what is the code ?", answers="4821", merge_size=4)
    assert page.startswith("<!DOCTYPE html>")
    parsed = _parse(page)
    assert len(parsed.tokens) == len(COMPRESSION["tokens"])
    assert len(parsed.groups) == 3
    memories = [int(token["data-memory"]) for token in parsed.tokens]
    assert memories == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    weights = [float(token["data-weight"]) for token in parsed.tokens]
    assert weights == [0.25, 0.75, 0.1, 0.1, 0.2, 0.3, 0.3, 0.5, 0.5]
    # Shading is relative to the group's heaviest token.
    assert "rgba(230, 85, 13, 1.000)" in parsed.tokens[1]["style"]
    assert "rgba(230, 85, 13, 0.333)" in parsed.tokens[0]["style"]
    # Groups smaller than the merge size (kept finer by the coarse stage) are marked.
    assert [group["class"] for group in parsed.groups] == ["group kept", "group", "group kept"]
    assert "budget 5/4" in parsed.groups[1]["title"]
    # Token text is escaped, not markup.
    assert " <b>" in "".join(parsed.text) and "<b>" not in page.split("<body>")[1].replace("<b>4821</b>", "")


def test_several_questions_give_one_section_each():
    page = render_compression_html([COMPRESSION, COMPRESSION], questions=["q1 ?", "q2 ?"], answers=["a", "b"])
    parsed = _parse(page)
    assert len(parsed.tokens) == 2 * len(COMPRESSION["tokens"])
    assert page.count("<h2>") == 2
