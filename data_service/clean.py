"""Document cleaning: jionlp's ``clean_text`` with our defaults, then the tokenizer's normalisation.

Defaults differ from jionlp's where jionlp deletes real content or changes what the released
model saw: brackets are kept (news puts real content in them), full-width punctuation is kept
(the vocab has ``，``; ``normalize_text`` maps only what the vocab lacks), repeated characters
are kept (``哈哈哈`` is text). HTML tags, URLs, e-mail addresses, phone numbers and characters
jionlp treats as exceptions (emoji, control characters) are removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io

from lfzh_ds.tokenization import normalize_text


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
        import jionlp
    return jionlp


def jionlp_version() -> str:
    from importlib.metadata import version  # without importing jionlp (slow) in the driver

    return version("jionlp")


def clean_document(text: str, options: CleanOptions = CleanOptions()) -> str:
    """Cleaned, vocab-normalised text with surrounding whitespace stripped."""
    if options.enabled:
        text = _jionlp().clean_text(
            text,
            remove_html_tag=options.remove_html_tag,
            convert_full2half=options.convert_full2half,
            remove_exception_char=options.remove_exception_char,
            remove_url=options.remove_url,
            remove_redundant_char=options.remove_redundant_char,
            remove_parentheses=options.remove_parentheses,
            remove_email=options.remove_email,
            remove_phone_number=options.remove_phone_number,
        )
    return normalize_text(text).strip()
