"""Cut a document's text into overlapping chunks counted in the embedding model's tokens.

Takes a Hugging Face `tokenizers` tokenizer (MiniLM's tokenizer.json), a window `size`
and an `overlap` in tokens; gives `Chunk`s that are slices of the source text by the
tokenizer's character offsets. The text is tokenized once; each window of `size` tokens
ends, where it can, at a paragraph or sentence end in its last fifth, and never inside a
word unless one word fills the window, so a chunk re-tokenizes to the count it claims.
The next window starts `overlap` tokens before the previous one ended, or a little
earlier, at the start of the word that token is in. A megabyte takes about a second,
without holding the GIL: call `chunk` from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers

# Full-width stops (ideographic full stop, exclamation and question marks) end a sentence
# with no space after them.
CJK_SENTENCE_ENDS = frozenset("\u3002\uff01\uff1f")
SENTENCE_ENDS = frozenset(".!?") | CJK_SENTENCE_ENDS


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str  # source[start:end]
    start: int
    end: int
    tokens: int


class Chunker:
    def __init__(self, tokenizer: tokenizers.Tokenizer, size: int, overlap: int) -> None:
        if size < 1:
            raise ValueError(f"chunk size must be at least 1 token, not {size}")
        if overlap < 0 or overlap >= size:
            raise ValueError(f"chunk overlap must be in [0, {size}) tokens, not {overlap}")
        self.size = size
        self.overlap = overlap
        # A copy: the embedder configures truncation and padding on its own tokenizer.
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: Path, size: int, overlap: int) -> Chunker:
        return cls(tokenizers.Tokenizer.from_file(str(path)), size, overlap)

    def count(self, text: str) -> int:
        """Tokens in `text`, without the [CLS]/[SEP] the embedder adds."""
        return len(self._encode(text).ids)

    def chunk(self, text: str) -> list[Chunk]:
        encoding = self._encode(text)
        offsets, words = encoding.offsets, encoding.word_ids
        total = len(offsets)
        chunks: list[Chunk] = []
        first = 0
        while first < total:
            last = min(first + self.size, total)  # exclusive
            if last < total:
                last = self._cut(text, offsets, words, first, last)
            start, end = offsets[first][0], offsets[last - 1][1]
            chunks.append(Chunk(len(chunks), text[start:end], start, end, last - first))
            if last == total:
                break
            first = _next_start(words, first, last, last - self.overlap)
        return chunks

    def _encode(self, text: str) -> tokenizers.Encoding:
        # encode_batch lets go of the GIL and encode does not: a megabyte takes about a
        # second, which in a worker thread must not stall the event loop.
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0]

    def _cut(
        self,
        text: str,
        offsets: list[tuple[int, int]],
        words: list[int | None],
        first: int,
        limit: int,
    ) -> int:
        """Where to end the window [first, limit): the best boundary, latest first.

        A paragraph break beats a sentence end beats any word boundary; only the last
        fifth of the window is searched for the first two, so chunks stay near full.
        """
        # Never so early that the next window would not move forward.
        earliest = max(first + self.size - self.size // 5, first + self.overlap + 1)
        word_end = None
        sentence_end = None
        for cut in range(limit, first, -1):
            if _inside_word(words, cut):
                continue
            if word_end is None:
                word_end = cut
            if cut < earliest:
                break
            gap = text[offsets[cut - 1][1] : offsets[cut][0]]
            if "\n\n" in gap:
                return cut
            if sentence_end is None:
                stop = text[offsets[cut - 1][1] - 1]
                if stop in CJK_SENTENCE_ENDS or (stop in SENTENCE_ENDS and gap.isspace()):
                    sentence_end = cut
        if sentence_end is not None:
            return sentence_end
        if word_end is not None and word_end > first + self.overlap:
            return word_end
        return limit


def _inside_word(words: list[int | None], token: int) -> bool:
    """Whether `token` continues the word of the token before it."""
    return words[token] is not None and words[token] == words[token - 1]


def _next_start(words: list[int | None], first: int, last: int, target: int) -> int:
    """The next window's first token: `target`, or the start of the word it is in.

    Back to the word's start (a little more overlap) if that still moves forward, else
    on to the next word's start (a little less), else `target` itself, mid-word.
    """
    back = target
    while back > first + 1 and _inside_word(words, back):
        back -= 1
    if not _inside_word(words, back):
        return back
    for forward in range(target + 1, last + 1):
        if forward == last or not _inside_word(words, forward):
            return forward
    return target
