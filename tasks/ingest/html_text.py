"""Main-content text of an HTML page: the extraction backends (resiliparse, trafilatura), their
options, and the cleanup that gives both the same whitespace conventions.

:func:`html_to_text` runs a backend in this process, without bounds. Extraction runs third-party
parsers on untrusted input, and those have pathological cases, so anything from the open web goes
through :class:`llmflow.tasks.ingest.bounded_extractor.BoundedExtractor`, which runs the same
:func:`_extract` in a worker process it can kill.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from llmflow.tasks.ingest.page_decoding import PageRejected

__all__ = [
    "DEFAULT_EXTRACTOR",
    "EXTRACTORS",
    "RESILIPARSE_OPTIONS",
    "TRAFILATURA_OPTIONS",
    "ExtractionError",
    "html_to_text",
]


class ExtractionError(PageRejected):
    """Extraction of one page failed: timeout, memory bound, or the library gave up.

    ``links``: the page's links when they were found before the text failed (a hub page whose
    text is rejected still leads somewhere); empty when the worker gave no answer.
    """

    links: list[str] = []  # noqa: RUF012 - replaced per instance, never mutated


EXTRACTORS = ("resiliparse", "trafilatura")
# Chosen by bench/html_extractors.py (see bench/html_extractors.md): higher F1 on both corpora
# with ground truth (Python docs 0.978 against 0.946, pydoc 0.973 against 0.965) and about ten
# times faster (about 400 against 40 pages/s over all sources, on 2 cores).
DEFAULT_EXTRACTOR = "resiliparse"

# resiliparse.extract.html2text.extract_plain_text, resiliparse 2.0.
RESILIPARSE_OPTIONS: dict[str, Any] = {
    # Block elements become line breaks (paragraphs: a blank line), <pre> keeps its layout.
    # Without it the whole page is one line and line-based quality filters see nothing.
    "preserve_formatting": True,
    # The point of the exercise: drop navigation, headers, footers and sidebars.
    "main_content": True,
    # "• " / "1. " before list items keeps list structure readable as plain text.
    "list_bullets": True,
    # alt texts are mostly "logo", "icon", file names: noise inside running text.
    "alt_texts": False,
    # Link targets inline ("text (https://...)") are URLs, not language.
    "links": False,
    # Button labels and input values are interface, not content.
    "form_fields": False,
    # <noscript> is almost always "please enable JavaScript".
    "noscript": False,
    # User comments are off-topic, repetitive and the lowest-quality text on a page; the
    # document is the article. (trafilatura's include_comments below is off for the same reason.)
    "comments": False,
    # Bylines and "posted on" lines are boilerplate-like; trafilatura leaves them out as well.
    "post_meta": False,
    # Elements hidden by class name (collapsed menus, modal dialogs) are not what a reader sees.
    "hidden_elements": False,
}

# trafilatura.extract, trafilatura 2.x.
TRAFILATURA_OPTIONS: dict[str, Any] = {
    "output_format": "txt",
    # Pages that lay out their content with tables (pydoc, many older sites) lose much of it
    # otherwise: recall 0.67 against 0.98 on 20 of the benchmark's pydoc pages.
    "include_tables": True,
    # See RESILIPARSE_OPTIONS["comments"].
    "include_comments": False,
    # No markdown markers, image references or link targets in the text.
    "include_formatting": False,
    "include_images": False,
    "include_links": False,
    # Recall: the balanced default drops a third of the text of table-laid-out pages (pydoc:
    # recall 0.69 against 0.97 with favor_recall) and is no better on the Sphinx pages; later
    # stages filter junk, but text dropped here is gone. favor_precision lost recall on both.
    "favor_recall": True,
    "favor_precision": False,
    # fast=True skips the readability/jusText fallbacks, which rescue pages the main heuristics
    # leave (nearly) empty.
    "fast": False,
    # trafilatura's deduplication keeps a process-wide cache, so a page's text would depend on
    # which pages the same worker saw before. Deduplication is a later, corpus-wide stage.
    "deduplicate": False,
    "with_metadata": False,
}


def _extract_resiliparse(html: str, url: str | None, options: dict[str, Any]) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, **options)


def _extract_trafilatura(html: str, url: str | None, options: dict[str, Any]) -> str:
    import trafilatura

    return trafilatura.extract(html, url=url, **options) or ""


_BACKENDS: dict[str, tuple[Callable[[str, str | None, dict[str, Any]], str], dict[str, Any]]] = {
    "resiliparse": (_extract_resiliparse, RESILIPARSE_OPTIONS),
    "trafilatura": (_extract_trafilatura, TRAFILATURA_OPTIONS),
}

_SURROGATES = re.compile("[\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[ \t\r\f\v]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    """Same whitespace conventions for both backends: no trailing blanks, one blank line at most.

    Stray U+FEFF (byte order marks pasted into templates, seen in the benchmark's web pages) go
    too: invisible, and never text.
    """
    text = _TRAILING_SPACE.sub("\n", text.replace("\r\n", "\n").replace("\ufeff", ""))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _is_lexbor_allocation_failure(error: Exception) -> bool:
    """lexbor's LXB_STATUS_ERROR_MEMORY_ALLOCATION (status 2), which resiliparse reports as a
    parser error rather than MemoryError."""
    return type(error).__name__ == "HTMLParserException" and "(Error 2)" in str(error)


def _extract(
    html: str, extractor: str, url: str | None = None, options: dict[str, Any] | None = None
) -> str:
    """html_to_text with the backend options overridable (the benchmark compares variants)."""
    try:
        function, default_options = _BACKENDS[extractor]
    except KeyError:
        raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}") from None
    if not html or html.isspace():
        return ""
    try:
        html.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (a reader that decoded with surrogateescape): resiliparse refuses the
        # whole string, so they become U+FFFD like any other undecodable byte.
        html = _SURROGATES.sub("\ufffd", html)
    try:
        text = function(html, url, default_options if options is None else options)
    except MemoryError as error:
        raise ExtractionError("extract_memory", f"{extractor}: out of memory") from error
    except Exception as error:  # the libraries raise anything from parser errors to TypeError
        if _is_lexbor_allocation_failure(error):
            raise ExtractionError("extract_memory", f"{extractor}: {error}") from error
        raise ExtractionError("extract_failed", f"{extractor}: {error!r}"[:500]) from error
    return _tidy(text)


def html_to_text(html: str, extractor: str = DEFAULT_EXTRACTOR, url: str | None = None) -> str:
    """Main-content text of a page, in this process and without bounds.

    Use it for trusted or already-vetted HTML (tests, small local files); anything from the open
    web goes through :class:`BoundedExtractor`. Library failures come out as
    :class:`ExtractionError` so that callers handle one exception type.
    """
    return _extract(html, extractor, url)
