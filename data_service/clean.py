"""Document cleaning: jionlp's ``clean_text`` with our defaults, then the tokenizer's normalisation.

Defaults differ from jionlp's where jionlp deletes real content or changes what the released
model saw: brackets are kept (news puts real content in them), full-width punctuation is kept
(the vocab has ``，``; ``normalize_text`` maps only what the vocab lacks), repeated characters
are kept (``哈哈哈`` is text). HTML tags, URLs, e-mail addresses and phone numbers are removed.
``remove_exception_char`` replaces only ``EXCEPTION_CHARS`` by a space: emoji (U+1F000-U+1FAFF,
variation selectors, joiners, tags), control characters other than whitespace, private-use
characters and lone surrogates. jionlp's own option of that name is never used: it deletes every
character outside a short allow-list (``café`` -> ``caf``, Greek, Cyrillic, kana, Hangul, ``²``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
from importlib.metadata import version

from lfzh_ds.tokenization import normalize_text

EXCEPTION_CHARS = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f"  # control characters; \t \n \v \f \r are kept
    "\ud800-\udfff\ue000-\uf8ff\U000f0000-\U0010ffff"  # lone surrogates, private use
    "\U0001f000-\U0001faff\ufe0e\ufe0f\u200d\U000e0000-\U000e007f]")  # emoji and their modifiers


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    remove_html_tag: bool = True
    remove_url: bool = True
    remove_email: bool = True
    remove_phone_number: bool = True
    remove_exception_char: bool = True
    remove_parentheses: bool = False
    remove_redundant_char: bool = False
    convert_full2half: bool = False
    enabled: bool = True  # False: only the tokenizer's normalisation


@functools.lru_cache(maxsize=None)
def _jionlp():
    """Import jionlp without its banner lines on stdout (they would corrupt piped output)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import jionlp  # here, not above: slow, and the driver never cleans
    return jionlp


def jionlp_version() -> str:
    return version("jionlp")  # without importing jionlp (slow) in the driver


def clean_document(text: str, options: CleanOptions = CleanOptions()) -> str:
    """Cleaned, vocab-normalised text with surrounding whitespace stripped."""
    if options.enabled:
        text = _jionlp().clean_text(
            text,
            remove_html_tag=options.remove_html_tag,
            convert_full2half=options.convert_full2half,
            remove_exception_char=False,  # deletes real letters; EXCEPTION_CHARS below instead
            remove_url=options.remove_url,
            remove_redundant_char=options.remove_redundant_char,
            remove_parentheses=options.remove_parentheses,
            remove_email=options.remove_email,
            remove_phone_number=options.remove_phone_number,
        )
        if options.remove_exception_char:
            text = EXCEPTION_CHARS.sub(" ", text)
    return normalize_text(text).strip()
