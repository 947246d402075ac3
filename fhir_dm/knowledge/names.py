"""How names printed by labs are compared: as words (shared by the loader and the matcher)."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


@lru_cache(maxsize=8192)
def normalise_name(text: str) -> str:
    """A name as words: case, width and punctuation folded, Greek letters spelt out, letters
    and digits apart, so "TIF-1γ", "TIF1-gamma" and "Anti-TIF-1gamma Ab" share "tif 1 gamma".
    """
    if not text.isascii():  # most names are ASCII: skip the per-character work
        text = "".join(
            f" {unicodedata.name(ch, ch).split()[-1]} "
            if "GREEK" in unicodedata.name(ch, "") and ch.isalpha()
            else ch
            for ch in unicodedata.normalize("NFKC", text)
        )
    spelt = text.casefold()
    spelt = re.sub(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])", " ", spelt)
    return " ".join(re.findall(r"[^\W_]+", spelt))


def contains_name(text: str, name: str) -> bool:
    """True if `name` occurs in `text` as whole words, both compared as normalised names."""
    return f" {normalise_name(name)} " in f" {normalise_name(text)} "
