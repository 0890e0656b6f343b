"""Links of an HTML page, and the one guard every parser of untrusted HTML here gets first.

lxml (links) and resiliparse (text) are both quadratic in the attributes of one tag: a page with
one tag holding 80,000 attributes kept lxml busy for minutes. :func:`cap_tags` shortens such tags
before any parser sees them, and the crawler runs both parsers in the bounded extraction worker
(:class:`llmflow.tasks.ingest.bounded_extractor.BoundedExtractor`), whose CPU budget is the last
word.
"""

from __future__ import annotations

import re
from urllib.parse import urldefrag, urljoin, urlsplit

__all__ = ["MAX_TAG_CHARS", "cap_tags", "extract_links"]

# A start tag longer than this keeps its name only. Real pages have such tags only for inline
# data (SVG paths, data: URIs), which holds no text and no link worth following; 16 KiB of
# attributes parse in milliseconds.
MAX_TAG_CHARS = 16 * 1024
_LONG_TAG = re.compile(rf"<([A-Za-z][A-Za-z0-9:_-]*)[^>]{{{MAX_TAG_CHARS},}}>")
_SURROGATES = re.compile("[\ud800-\udfff]")


def cap_tags(html: str) -> str:
    """``html`` with every start tag over MAX_TAG_CHARS cut down to its bare name (linear)."""
    if len(html) <= MAX_TAG_CHARS:
        return html
    return _LONG_TAG.sub(r"<\1>", html)


_URL_WHITESPACE = re.compile(r"[\t\n\r]")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def _clean_href(href: str | None) -> str | None:
    """The URL standard strips leading/trailing C0 controls and spaces and drops tabs/newlines."""
    if href is None:
        return None
    return _URL_WHITESPACE.sub("", href.strip(_C0_AND_SPACE))


def _http_url(url: str) -> str | None:
    """``url`` without its fragment if it is a well-formed absolute http(s) URL."""
    url = urldefrag(url).url
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return url


def extract_links(html: str, base_url: str) -> list[str]:
    """Absolute http(s) targets of ``<a href>`` links, in document order, without duplicates.

    The first ``<base href>`` of the document wins, resolved against ``base_url`` as browsers do;
    a base that is not http(s) is ignored. Fragments are dropped (they name a place in a page the
    crawler fetches anyway); javascript:, mailto:, tel:, data: and the like are skipped.
    """
    # lxml, not resiliparse's DOM: resiliparse's query_selector_all took 21 s on pydoc's builtins
    # page (590 KB, thousands of anchors) where lxml takes 0.1 s.
    from lxml import etree
    from lxml import html as lxml_html

    if not html or not html.strip():
        return []
    html = cap_tags(html)
    try:
        html.encode("utf-8")
    except UnicodeEncodeError:
        html = _SURROGATES.sub("\ufffd", html)
    try:
        try:
            document = lxml_html.document_fromstring(html)
        except ValueError:  # a str with an XML encoding declaration: parse its UTF-8 bytes
            document = lxml_html.document_fromstring(html.encode("utf-8"))
    except (etree.ParserError, ValueError):
        return []
    base = base_url
    base_element = document.find(".//base[@href]")
    if base_element is not None:
        href = _clean_href(base_element.get("href"))
        if href:
            try:
                candidate = _http_url(urljoin(base_url, href))
            except ValueError:
                candidate = None
            if candidate:
                base = candidate

    links: list[str] = []
    seen: set[str] = set()
    # A page repeats its hrefs (navigation) and has one "#..." anchor per section, all of which
    # resolve to the page itself: each distinct href is joined once (urljoin was most of the
    # cost of a page of rust-doc, 316 anchors to 37 links).
    resolved: dict[str, str | None] = {}
    for element in document.iter("a"):
        href = _clean_href(element.get("href"))
        if href is None:
            continue
        key = "#" if href.startswith("#") else href
        if key in resolved:
            continue
        try:
            url = resolved[key] = _http_url(urljoin(base, key))
        except ValueError:  # urljoin on a malformed IPv6 host
            resolved[key] = None
            continue
        if url and url not in seen:
            seen.add(url)
            links.append(url)
    return links
