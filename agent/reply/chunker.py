"""Cut streamed LLM text (Chinese and English) into sentence chunks for the TTS.

Pure and synchronous: `push()` takes text fragments as they arrive and returns every chunk
that is complete, `flush()` returns the rest at the end of the stream. A chunk ends after
。！？； (and any closing quotes), after . ! ? ; when what follows shows a sentence boundary,
or at a newline. A "." decides on the character after it (3.5, Mr. Smith, e.g.); the other
marks cut as soon as they arrive, so a closing quote or a URL's "?" that comes in the next
LLM fragment lands in the next chunk: a spoken reply loses nothing by it, and its first
audio does not wait for another fragment. Chunks lighter than `min_weight`
are merged with the next one, so the TTS is never handed "OK." on its own; text that runs
past `max_weight` without a boundary is cut at the last comma or space, so a run-on sentence
cannot hold up the first audio.
"""

from __future__ import annotations

import re

# Sentence ends that need no look-ahead: a full-width mark ends the sentence whatever follows.
_CJK_ENDS = "。！？；"
_ASCII_ENDS = ".!?;"
# Closing quotes and brackets that belong to the sentence before the boundary.
_CLOSERS = "\"'”’)]}」』》）】"
# Where an over-long chunk may be cut when no sentence end comes.
_SOFT_BREAKS = "，,、：:—"
# A "." after these words is not a sentence end ("Mr. Smith", "approx. 5"). Tokens that
# already contain a dot ("e.g", "i.e", "U.S", "a.m") and single letters (initials) are
# treated the same way without being listed.
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "approx", "fig", "no",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "inc", "ltd", "co", "corp", "dept", "est", "gen", "gov", "lt", "col", "sgt", "rev",
})
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")


def _is_cjk(ch: str) -> bool:
    """CJK ideographs, kana and full-width forms: scripts written without spaces."""
    o = ord(ch)
    return (0x3000 <= o <= 0x9FFF) or (0xF900 <= o <= 0xFAFF) or (0xFF00 <= o <= 0xFFEF)


def weight(text: str) -> int:
    """Chunk size as the TTS feels it: one per visible character, two per CJK character.

    A CJK character is a syllable, about as long spoken as two or three Latin letters.
    """
    return sum(2 if _is_cjk(c) else 1 for c in text if not c.isspace())


def _abbreviation_before(buf: str, dot: int) -> bool:
    """True when the "." at `dot` closes an abbreviation or an initial, not a sentence."""
    m = _WORD_BEFORE.search(buf, 0, dot)
    if not m:
        return False
    word = m.group(1)
    if len(word) == 1:
        return word != "I"  # an initial ("J. Smith"), but "...than I. Then" ends
    return "." in word or word.lower() in _ABBREVIATIONS


class SentenceChunker:
    """Incremental sentence splitter; one instance per reply."""

    def __init__(self, min_weight: int = 8, max_weight: int = 160) -> None:
        if min_weight < 0 or max_weight <= min_weight:
            raise ValueError("need 0 <= min_weight < max_weight")
        self.min_weight = min_weight
        self.max_weight = max_weight
        self._buf = ""
        self._scan = 0  # boundaries before this index were already rejected (too light)

    def push(self, fragment: str) -> list[str]:
        """Add a fragment; return the chunks it completed (possibly none)."""
        self._buf += fragment
        return self._cut(final=False)

    def flush(self) -> list[str]:
        """End of stream: every remaining chunk, the last one whatever its weight."""
        out = self._cut(final=True)
        rest = self._buf.strip()
        self._buf, self._scan = "", 0
        if rest:
            out.append(rest)
        return out

    def _cut(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            end = self._next_boundary(final)
            if end is None:
                break
            chunk = self._buf[:end].strip()
            if weight(chunk) >= self.min_weight:
                out.append(chunk)
                self._buf, self._scan = self._buf[end:], 0
            else:
                self._scan = end  # too light: keep it and look for the next boundary
        long_cut = self._overlong_cut()
        if long_cut is not None:
            out.append(self._buf[:long_cut].strip())
            self._buf, self._scan = self._buf[long_cut:], 0
            out.extend(self._cut(final))
        return [c for c in out if c]

    def _next_boundary(self, final: bool) -> int | None:
        """Index just past the next sentence end at or after `_scan`, or None (yet)."""
        buf, n = self._buf, len(self._buf)
        i = self._scan
        while i < n:
            ch = buf[i]
            if ch == "\n":
                return i + 1
            if ch in _CJK_ENDS or ch in _ASCII_ENDS:
                j = i + 1
                while j < n and (buf[j] in _CJK_ENDS or buf[j] in _ASCII_ENDS or buf[j] == "."):
                    j += 1  # "?!", "...", "。。"
                while j < n and buf[j] in _CLOSERS:
                    j += 1
                if j == n and not final:
                    # The mark ends what has arrived. "." waits for the next character (3.5,
                    # Mr. Smith); the others cut now: waiting one more LLM event would delay
                    # every reply's first audio, to spare a rare "?" inside a URL.
                    return None if buf[i:j].startswith(".") and ch == "." else j
                if ch in _CJK_ENDS:
                    return j
                verdict = self._ascii_end(i, j, final)
                if verdict is None:
                    return None  # undecidable until more text arrives
                if verdict:
                    return j
                i = j
                continue
            i += 1
        return None

    def _ascii_end(self, mark: int, after: int, final: bool) -> bool | None:
        """Does the ASCII mark at `mark` (run ending at `after`) end a sentence?"""
        buf = self._buf
        if after >= len(buf):
            return True if final else None
        nxt = buf[after]
        if _is_cjk(nxt):
            return True  # "...in Python.它很好"
        if not nxt.isspace():
            return False  # "3.5", "example.com/a?b=1", "e.g.," ...
        if buf[mark] != "." or buf[mark:after].startswith(".."):
            return True  # ! ? ; and ellipses end a sentence at a space
        if _abbreviation_before(buf, mark):
            return False
        # A "." then space: a sentence end unless the next word starts in lower case
        # ("approx. five"): English sentences start with a capital, digit or quote.
        k = after
        while k < len(buf) and buf[k].isspace():
            if buf[k] == "\n":
                return True
            k += 1
        if k >= len(buf):
            return True if final else None
        return not buf[k].islower()

    def _overlong_cut(self) -> int | None:
        """Where to cut a buffer that grew past `max_weight` with no sentence end."""
        if weight(self._buf) <= self.max_weight:
            return None
        # Find the prefix of max_weight, then the last soft break (or space) inside it.
        w, limit = 0, len(self._buf)
        for idx, c in enumerate(self._buf):
            w += 0 if c.isspace() else (2 if _is_cjk(c) else 1)
            if w > self.max_weight:
                limit = idx
                break
        head = self._buf[:limit]
        for breaks in (_SOFT_BREAKS, " "):
            pos = max(head.rfind(b) for b in breaks)
            if pos > 0 and weight(head[:pos + 1]) >= self.min_weight:
                return pos + 1
        return limit
