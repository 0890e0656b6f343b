"""Charset decoding, extraction in process, link discovery: real libraries, no mocks.

Extraction under bounds (the worker pool) is tested in tests/test_bounded_extractor.py.
"""

from __future__ import annotations

import pickle

import pytest

from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.html_links import extract_links
from llmflow.tasks.ingest.html_text import (
    DEFAULT_EXTRACTOR,
    EXTRACTORS,
    ExtractionError,
    html_to_text,
)
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body

# --- decode_body ---------------------------------------------------------------------------------

FRENCH = (
    "Le gâteau est très bon. Il a été préparé à la maison par ma grand-mère, qui adore cuisiner"
    " des spécialités françaises. « Ça coûte trois euros », dit-elle — c'est vrai. "
)


def page(body_text: str, head: str = "") -> str:
    return f"<html><head>{head}<title>Test</title></head><body><p>{body_text}</p></body></html>"


def test_utf8_header() -> None:
    html = page("Grüße aus Köln, 東京 and ümlauts")
    text, charset = decode_body(html.encode("utf-8"), "text/html; charset=UTF-8")
    assert (text, charset) == (html, "utf-8")


def test_quoted_header_charset() -> None:
    html = page("Grüße")
    assert decode_body(html.encode("utf-8"), 'text/html; charset="utf-8"') == (html, "utf-8")


def test_wrong_utf8_header_falls_through_to_meta() -> None:
    html = page(
        FRENCH * 3,
        head='<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">',
    )
    text, charset = decode_body(html.encode("cp1252"), "text/html; charset=utf-8")
    assert (text, charset) == (html, "cp1252")


def test_wrong_utf8_header_falls_through_to_detection() -> None:
    html = page(FRENCH * 3)
    text, charset = decode_body(html.encode("cp1252"), "text/html; charset=utf-8")
    assert (text, charset) == (html, "cp1252")


def test_meta_charset_without_header() -> None:
    html = page("Zażółć gęślą jaźń. Pchnąć w tę łódź jeża.", head='<meta charset="iso-8859-2">')
    assert decode_body(html.encode("iso-8859-2"), None) == (html, "iso8859-2")


def test_meta_http_equiv() -> None:
    html = page(
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        head="<meta http-equiv='content-type' content='text/html;charset=windows-1251'>",
    )
    assert decode_body(html.encode("cp1251"), "text/html") == (html, "cp1251")


def test_bom_wins_over_header() -> None:
    html = page("naïve café")
    body = b"\xef\xbb\xbf" + html.encode("utf-8")
    assert decode_body(body, "text/html; charset=iso-8859-1") == (html, "utf-8")


def test_utf16_bom() -> None:
    html = page("naïve café")
    assert decode_body(b"\xff\xfe" + html.encode("utf-16-le"), None) == (html, "utf-16-le")


def test_utf16_with_one_unpaired_surrogate_is_text_not_binary() -> None:
    """Half a surrogate pair (U+D800 alone) in otherwise valid UTF-16: damaged text, kept with
    U+FFFD in its place; its NUL bytes used to send it to the binary sniffing."""
    before, after = page("naïve café " * 20), page("the rest " * 20)
    damaged = before.encode("utf-16-le") + b"\x00\xd8" + after.encode("utf-16-le")
    assert decode_body(b"\xff\xfe" + damaged, None) == (before + "\ufffd" + after, "utf-16-le")
    label = "text/html; charset=utf-16le"
    assert decode_body(damaged, label) == (before + "\ufffd" + after, "utf-16-le")
    # Noise that merely starts with a BOM is still no text.
    noise = b"\xff\xfe" + b"\x00\xd8" * 400
    with pytest.raises(DecodeError) as caught:
        decode_body(noise, None)
    assert caught.value.reason == "binary_content"


def test_latin1_label_means_windows_1252() -> None:
    # Browsers read "iso-8859-1" as windows-1252; 0x93/0x94 are curly quotes there.
    body = page("\x93quoted\x94 and caf\xe9").encode("latin-1")
    text, charset = decode_body(body, "text/html; charset=ISO-8859-1")
    assert charset == "cp1252"
    assert "“quoted” and café" in text


def test_valid_utf8_beats_single_byte_label() -> None:
    html = page("café crème")
    assert decode_body(html.encode("utf-8"), "text/html; charset=iso-8859-1") == (html, "utf-8")


@pytest.mark.parametrize(
    "body",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
        b"<html><body>\x00\x00\x00\x01 text with NUL bytes</body></html>",
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        bytes(range(1, 9)) * 200,  # control bytes, no NUL
    ],
    ids=["png", "nul", "gzip", "pdf", "controls"],
)
def test_binary_content(body: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_body(body, "text/html; charset=utf-8")
    assert caught.value.reason == "binary_content"
    assert isinstance(caught.value, ValueError)


def test_empty_body_is_empty_text() -> None:
    assert decode_body(b"", None) == ("", "utf-8")
    assert decode_body(b"", "text/html; charset=windows-1251") == ("", "cp1251")


def test_undecodable() -> None:
    # Invalid UTF-8 under a UTF-8 label, and no single-byte charset makes sense of it either.
    body = bytes(range(0x80, 0x100)) * 20
    with pytest.raises(DecodeError) as caught:
        decode_body(body, "text/html; charset=utf-8")
    assert caught.value.reason in {"undecodable", "binary_content"}


def test_errors_pickle() -> None:
    error = pickle.loads(pickle.dumps(DecodeError("undecodable", "nothing fits")))
    assert (error.reason, error.detail) == ("undecodable", "nothing fits")
    error = pickle.loads(pickle.dumps(ExtractionError("extract_cpu_timeout", "10 s")))
    assert (error.reason, error.detail) == ("extract_cpu_timeout", "10 s")


# --- html_to_text --------------------------------------------------------------------------------

ARTICLE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tide pools | Coastal Notes</title>
<style>body { font-family: serif }</style><script>var tracking = "abc123";</script></head>
<body>
<header><a href="/" class="logo"><img src="logo.png" alt="Coastal Notes logo"></a>
<nav class="menu"><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li>
<li><a href="/about">About us</a></li><li><a href="/contact">Contact</a></li></ul></nav></header>
<main><article>
<h1>What lives in a tide pool</h1>
<p class="byline">By Jane Doe, 3 May 2024</p>
<p>Tide pools are small worlds left behind when the sea draws back. Twice a day the water
retreats and the animals that stay must survive heat, wind and the beaks of hungry gulls.</p>
<p>Sea anemones close into soft green buttons to keep their moisture, while periwinkles seal
their shells with a trapdoor called an operculum and wait for the tide to return.</p>
<p>Ochre sea stars are the hunters of the pool: they pry mussels open with hundreds of tube feet
and push their own stomach inside the shell to digest the prey.</p>
</article></main>
<aside class="sidebar"><h3>Popular posts</h3><ul><li><a href="/p/1">Ten best beaches</a></li>
<li><a href="/p/2">Packing for a storm</a></li></ul></aside>
<footer><p>Copyright 2024 Coastal Notes. All rights reserved.</p>
<a href="/privacy">Privacy policy</a> | <a href="/terms">Terms of use</a></footer>
</body></html>"""


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_html_to_text_keeps_the_article(extractor: str) -> None:
    text = html_to_text(ARTICLE, extractor, url="https://example.org/tide-pools")
    for sentence in (
        "Tide pools are small worlds left behind",
        "trapdoor called an operculum",
        "push their own stomach inside the shell",
    ):
        assert sentence in " ".join(text.split())
    assert "tracking" not in text and "font-family" not in text
    assert "Popular posts" not in text
    # Paragraphs stay separate lines.
    assert len([line for line in text.splitlines() if line.strip()]) >= 3


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_html_to_text_empty_and_lone_surrogates(extractor: str) -> None:
    assert html_to_text("", extractor) == ""
    assert html_to_text("  \n ", extractor) == ""
    damaged = ARTICLE.replace("operculum", "opercu\udcfflum")
    assert "Tide pools" in html_to_text(damaged, extractor)


def test_unknown_extractor() -> None:
    with pytest.raises(ValueError):
        html_to_text(ARTICLE, "beautifulsoup")
    with pytest.raises(ValueError):
        BoundedExtractor("beautifulsoup")


def test_default_extractor_is_one_of_them() -> None:
    assert DEFAULT_EXTRACTOR in EXTRACTORS


# --- extract_links -------------------------------------------------------------------------------

LINKS = """<html><head><title>x</title></head><body>
<a href="/docs/intro.html">intro</a>
<a href="guide.html#install">guide, section</a>
<a href="guide.html#usage">guide, other section</a>
<a href="#top">top of this page</a>
<a href="https://other.example/page?q=1&amp;r=2">elsewhere</a>
<a href="mailto:someone@example.org">mail</a>
<a href="javascript:void(0)">script</a>
<a href="tel:+123">phone</a>
<a href="ftp://files.example/x">ftp</a>
<a href="  /docs/intro.html ">intro again, padded</a>
<a href="//cdn.example/lib.js">protocol-relative</a>
<a href="http://[::1">malformed</a>
<a name="anchor-without-href">no href</a>
</body></html>"""


def test_extract_links_resolves_and_filters() -> None:
    assert extract_links(LINKS, "https://example.org/docs/index.html") == [
        "https://example.org/docs/intro.html",
        "https://example.org/docs/guide.html",
        "https://example.org/docs/index.html",
        "https://other.example/page?q=1&r=2",
        "https://cdn.example/lib.js",
    ]


def test_extract_links_honours_base_href() -> None:
    html = LINKS.replace(
        "<title>x</title>", '<title>x</title><base href="https://mirror.example/v2/">'
    )
    links = extract_links(html, "https://example.org/docs/index.html")
    assert links[:3] == [
        "https://mirror.example/docs/intro.html",
        "https://mirror.example/v2/guide.html",
        "https://mirror.example/v2/",
    ]


def test_extract_links_relative_base_and_empty() -> None:
    html = '<html><head><base href="sub/"></head><body><a href="a.html">a</a></body></html>'
    assert extract_links(html, "http://example.org/dir/page") == [
        "http://example.org/dir/sub/a.html"
    ]
    assert extract_links("", "http://example.org/") == []
