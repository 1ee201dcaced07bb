"""The sentence chunker on streamed Chinese and English text."""

from __future__ import annotations

import random

import pytest

from agent.reply.chunker import SentenceChunker, weight


def stream(text: str, sizes: list[int] | int = 3, **kw: int) -> tuple[list[str], list[int]]:
    """Feed `text` in fragments; the chunks, and after which fragment each came out."""
    c = SentenceChunker(**kw)
    out: list[str] = []
    when: list[int] = []
    i = n = 0
    while i < len(text):
        size = sizes if isinstance(sizes, int) else sizes[n % len(sizes)]
        got = c.push(text[i:i + size])
        out += got
        when += [n] * len(got)
        i += size
        n += 1
    got = c.flush()
    return out + got, when + [n] * len(got)


def test_english_sentences() -> None:
    text = "Sure, here it is. The weather is fine today! Do you want more? Fine; then go."
    chunks, _ = stream(text)
    assert chunks == ["Sure, here it is.", "The weather is fine today!", "Do you want more?",
                      "Fine; then go."]


def test_chinese_sentences_cut_at_once() -> None:
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？好的；那就走。"
    chunks, when = stream(text, 2)
    assert chunks == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？", "好的；那就走。"]
    # A full-width end needs no look-ahead: out with the fragment that holds it.
    assert when[0] == text.index("。") // 2


def test_decimal_numbers_abbreviations_and_urls_do_not_cut() -> None:
    text = ("It costs 3.5 dollars at Mr. Smith's shop, e.g. the one on Main St. downtown. "
            "See https://example.com/a.b?x=1!y for details. Version 2.0.1 is out.")
    expected = [
        "It costs 3.5 dollars at Mr. Smith's shop, e.g. the one on Main St. downtown.",
        "See https://example.com/a.b?x=1!y for details.",
        "Version 2.0.1 is out.",
    ]
    assert stream(text, len(text))[0] == expected
    # Streamed in odd fragments: every "." still waits for what follows it.
    dots_only = text.replace("?x=1!y", "")
    assert stream(dots_only, [1, 2, 5, 3])[0] == [c.replace("?x=1!y", "") for c in expected]


def test_dot_waits_for_the_next_character() -> None:
    c = SentenceChunker()
    assert c.push("The value is 3.") == []  # could be 3.5
    assert c.push("5 exactly. ") == []  # "exactly. " then "next"? lower case would not cut
    assert c.push("Next") == ["The value is 3.5 exactly."]
    assert c.flush() == ["Next"]


def test_lower_case_after_dot_is_not_a_sentence_start() -> None:
    chunks, _ = stream("Wait approx. five minutes please. Then call me.")
    assert chunks == ["Wait approx. five minutes please.", "Then call me."]


def test_closing_quotes_stay_with_their_sentence() -> None:
    text = 'He said "stop here." Then he left. 她说：“好的。”然后走了。'
    chunks, _ = stream(text, len(text))
    assert chunks == ['He said "stop here."', "Then he left.", "她说：“好的。”", "然后走了。"]
    # Streamed, a quote arriving after the "。" fragment opens the next chunk: nothing lost.
    c = SentenceChunker()
    assert c.push("她说：“好的。") == ["她说：“好的。"]
    assert c.push("”然后走了。") == ["”然后走了。"]


def test_marks_other_than_dot_cut_without_waiting() -> None:
    c = SentenceChunker()
    assert c.push("Is that the right one?") == ["Is that the right one?"]
    assert c.push(" It costs 3.") == []  # a "." waits: 3.5?
    assert c.push("5 euros!") == ["It costs 3.5 euros!"]


def test_newline_cuts() -> None:
    chunks, _ = stream("First item is long enough\nSecond item is long enough\n\nThird one")
    assert chunks == ["First item is long enough", "Second item is long enough", "Third one"]


def test_short_sentences_merge_with_the_next() -> None:
    chunks, _ = stream("OK. Yes! Let me check that. 好。好的，没问题。", min_weight=8)
    assert chunks == ["OK. Yes! Let me check that.", "好。好的，没问题。"]
    assert all(weight(c) >= 8 for c in stream("Hi. Yo. A longer sentence here.")[0])


def test_flush_returns_a_short_tail() -> None:
    chunks, _ = stream("This is a full sentence. OK")
    assert chunks == ["This is a full sentence.", "OK"]


def test_overlong_text_without_ends_is_cut_at_a_comma() -> None:
    text = "one, " * 40 + "end"
    chunks, _ = stream(text, 7, max_weight=40)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert all(weight(c) <= 40 for c in chunks)
    assert all(c.endswith(",") for c in chunks[:-1])
    assert len(chunks) > 3


def test_mixed_script_dot_before_chinese() -> None:
    chunks, _ = stream("I like writing Python.它真的很好用。")
    assert chunks == ["I like writing Python.", "它真的很好用。"]


@pytest.mark.parametrize("seed", range(20))
def test_fragmentation_does_not_change_the_chunks(seed: int) -> None:
    """However the LLM splits its tokens, the same chunks come out."""
    rng = random.Random(seed)
    # (Marks other than "." inside words, like a URL's "?", may cut where a fragment ends.)
    text = ("Dr. Li said the dose is 2.5 mg, i.e. half a pill. 请每天服用两次。"
            "Is that clear? Yes! Visit https://x.org/page.html today. 谢谢！\nBye for now.")
    whole, _ = stream(text, len(text))
    sizes = [rng.randint(1, 6) for _ in range(50)]
    assert stream(text, sizes)[0] == whole
    assert "".join(whole).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")


def test_bad_limits_refused() -> None:
    with pytest.raises(ValueError):
        SentenceChunker(min_weight=10, max_weight=5)
