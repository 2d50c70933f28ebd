"""Whole words from a tokenizer's pieces, and which of them name something (stopwords and punctuation out).

Tokenizers split words into pieces (WordPiece ``skate ##board``, SentencePiece ``▁skate board``, CLIP's BPE
``skate board</w>``); a person reads words. :func:`merge_pieces` groups the pieces back into words and
:func:`content_words` keeps those worth showing. Pure text: no tensors, indexes or HTTP here.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Sequence

# Function words a grounding overlay should not draw: articles, pronouns, prepositions, conjunctions,
# auxiliaries, a few fillers, and the pieces a tokenizer cuts from "kitten's" or "don't". Short on purpose:
# content words (colours, numbers, verbs of action) stay.
STOPWORDS = frozenset("""
a an the this that these those some any each every no
i me my we our you your he him his she her it its they them their one ones
of in on at by for with from to into onto over under up down out off about above below near beside between
behind through across along around against toward towards before after while during
and or but nor so yet as than then if because
is are was were be been being am do does did has have had having can could will would shall should may might
must not very too also just there here what which who whom whose where when how why all both
s t d ll re ve m
""".split())

_WORDPIECE = "##"
_SENTENCEPIECE = "\u2581"  # ▁ starts a word
_BYTE_BPE = "\u0120"  # Ġ starts a word (GPT-2 style)
_END_OF_WORD = "</w>"  # CLIP's BPE ends a word


@dataclass(frozen=True)
class Word:
    """A whole word and the positions of its pieces in the tokenizer's output."""

    text: str
    pieces: tuple[int, ...]


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(c in string.punctuation or unicodedata.category(c).startswith("P") for c in text)


def merge_pieces(pieces: Sequence[str]) -> list[Word]:
    """Group word pieces into whole words (lower-cased), keeping each word's piece positions.

    A piece continues the previous word when it starts with ``##`` (WordPiece), or when the previous piece
    did not end a word (``</w>`` BPE) or this one does not start one (``▁`` / ``Ġ`` tokenizers). Punctuation
    is always a word of its own.
    """
    marked_start = any(p.startswith((_SENTENCEPIECE, _BYTE_BPE)) for p in pieces)
    marked_end = any(p.endswith(_END_OF_WORD) for p in pieces)
    words: list[tuple[str, list[int]]] = []
    open_word = False  # the last word may still take pieces
    for i, piece in enumerate(pieces):
        text = piece
        continues = False
        if text.startswith(_WORDPIECE) and len(text) > len(_WORDPIECE):
            text, continues = text[len(_WORDPIECE):], True
        elif marked_start:
            if text.startswith((_SENTENCEPIECE, _BYTE_BPE)):
                text = text[1:]
            else:
                continues = True
        elif marked_end:
            continues = open_word
        ends = True
        if marked_end:
            ends = text.endswith(_END_OF_WORD)
            text = text[: -len(_END_OF_WORD)] if ends else text
        if not text:
            continue
        if continues and words and open_word and not _is_punctuation(text) and not _is_punctuation(words[-1][0]):
            words[-1][0] += text
            words[-1][1].append(i)
        else:
            words.append([text, [i]])  # type: ignore[arg-type]
        open_word = not ends if marked_end else True
    return [Word(text.lower(), tuple(idx)) for text, idx in words]


def is_content_word(text: str) -> bool:
    """False for stopwords and punctuation (what an overlay should not draw)."""
    return not _is_punctuation(text) and text.lower() not in STOPWORDS


def content_words(pieces: Sequence[str]) -> list[Word]:
    """The whole words of ``pieces`` that name something: :func:`merge_pieces` less stopwords and punctuation."""
    return [w for w in merge_pieces(pieces) if is_content_word(w.text)]


__all__ = ["STOPWORDS", "Word", "content_words", "is_content_word", "merge_pieces"]
