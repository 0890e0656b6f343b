"""Reading documents from files: real WARC/WET/ARC/JSONL archives and small files made here.

Most tests use a tag-stripping stand-in for the extractor: they are about records, damage and
accounting, and the real extractor's worker process would only make them slower. The tests about
decoded text (languages, ClueWeb's EUC-JP, WARC vs WET) use the real BoundedExtractor.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.file_sources import (
    FILE_SUFFIXES,
    expand_file_seed,
    is_file_seed,
    iter_file_documents,
)
from llmflow.tasks.ingest.html_text import ExtractionError

MAX = 5_000_000


class StandIn:
    """What the readers use of BoundedExtractor besides extract: one page at a time, in order."""

    def imap(self, fn, items):
        return map(fn, items)


class TagStripper(StandIn):
    """Stands in for BoundedExtractor where extraction quality is not what is tested."""

    def extract(self, html: str, url: str | None = None) -> str:
        html = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", html)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


class TimingOut(StandIn):
    def extract(self, html: str, url: str | None = None) -> str:
        raise _Timeout()


class _Timeout(ExtractionError):
    """An ExtractionError built without depending on the real class's constructor arguments."""

    def __init__(self) -> None:
        Exception.__init__(self, "extraction took too long")
        self.reason = "extract_cpu_timeout"
        self.detail = "over 0.1 s"


STRIP = TagStripper()


@pytest.fixture(scope="module")
def extractor() -> Iterator[BoundedExtractor]:
    with BoundedExtractor() as bounded:
        yield bounded


@pytest.fixture(scope="module")
def web(shared_data: Path) -> Path:
    return shared_data / "web"


def read(path: str | Path, extractor=STRIP, max_page_bytes: int = MAX) -> list:
    return list(iter_file_documents(str(path), extractor, max_page_bytes))


def kept(items: Iterable) -> list[Document]:
    return [d for d in items if isinstance(d, Document) and d.reject_reason is None]


def outcomes(items: Iterable) -> Counter:
    """'ok', a rejection reason, or 'failure:<reason>' per item, counted."""
    counts: Counter = Counter()
    for item in items:
        if isinstance(item, FetchFailure):
            counts[f"failure:{item.reason}"] += 1
        else:
            counts[item.reject_reason or "ok"] += 1
    return counts


def response_uris(path: Path) -> list[str]:
    """Target URIs of the response records, straight from warcio, to check against."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        return [
            r.rec_headers.get_header("WARC-Target-URI")
            for r in ArchiveIterator(f, arc2warc=True)
            if r.rec_type == "response"
        ]


def gzip_members(data: bytes) -> list[int]:
    """Offsets where a gzip member of a member-wise gzipped WARC begins (checked by decoding)."""
    import zlib

    offsets = []
    for m in re.finditer(re.escape(b"\x1f\x8b\x08"), data):
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[m.start() : m.start() + 65536], 8)
        except zlib.error:
            continue
        if head.startswith(b"WARC/"):
            offsets.append(m.start())
    return offsets


# ---------------------------------------------------------------------------------------------
# Seeds


def test_is_file_seed() -> None:
    assert not is_file_seed("https://example.com/")
    assert not is_file_seed("HTTP://example.com/")
    assert not is_file_seed("pydoc:")
    assert not is_file_seed("  ")
    for seed in ["data/crawl.warc.gz", "/abs/x.txt", "file:///x.jsonl", "s3://b/k/*.parquet"]:
        assert is_file_seed(seed)
    assert is_file_seed("memory://corpus/")


def test_expand_directory_is_recursive_sorted_and_skips_other_files(web: Path) -> None:
    # warcio/ also holds LICENSE; whirlwind/ a .wat.gz: neither is a document source.
    assert expand_file_seed(str(web / "warcio")) == [
        str(web / "warcio" / "example-iana.org-chunked.warc"),
        str(web / "warcio" / "example.arc.gz"),
        str(web / "warcio" / "example.warc.gz"),
    ]
    everything = expand_file_seed(str(web))
    assert everything == sorted(everything)
    assert len(everything) == 11
    assert str(web / "whirlwind" / "whirlwind.warc.wet.gz") in everything
    assert not any(p.endswith(("LICENSE", ".wat.gz")) for p in everything)


def test_expand_glob_file_and_errors(web: Path, tmp_path: Path) -> None:
    assert expand_file_seed(str(web / "dolma" / "*.jsonl.gz")) == [
        str(web / "dolma" / "cc_en_head-0091.jsonl.gz"),
        str(web / "dolma" / "cc_en_head-0174.jsonl.gz"),
    ]
    assert expand_file_seed(str(web / "*" / "sample-000?.warc.gz")) == [
        str(web / "dolma" / "sample-0000.warc.gz"),
        str(web / "dolma" / "sample-0001.warc.gz"),
    ]
    single = web / "warcio" / "example.warc.gz"
    assert expand_file_seed(str(single)) == [str(single)]
    assert expand_file_seed(single.as_uri()) == [str(single)]

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_file_seed(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match=r"\*\.warc"):
        expand_file_seed(str(tmp_path / "*.warc"))
    with pytest.raises(ValueError, match=r"LICENSE.*\.warc\.gz"):
        expand_file_seed(str(web / "warcio" / "LICENSE"))
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("x")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "b.txt").write_text("x")
    (tmp_path / ".hidden.txt").write_text("x")
    assert expand_file_seed(str(tmp_path)) == [str(tmp_path / "sub" / "a.txt")]
    with pytest.raises(ValueError, match="notes.md"):
        expand_file_seed(str(tmp_path / "*.md"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_file_seed(str(empty))
    with pytest.raises(ValueError, match="notes.md"):
        read(tmp_path / "notes.md")


def test_suffix_list_covers_the_config_description() -> None:
    for suffix in [".warc", ".warc.gz", ".wet", ".wet.gz", ".txt", ".html", ".jsonl", ".parquet"]:
        assert suffix in FILE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Real archives


def test_dolma_wget_warcs_every_response_is_one_document(web: Path) -> None:
    path = web / "dolma" / "sample-0000.warc.gz"
    items = read(path)
    # 48 records: warcinfo, 22 request/response pairs, a metadata and two resource records
    # (wget's log, under metadata:// URIs): only the responses are documents.
    assert outcomes(items) == Counter(ok=22)
    assert [d.url for d in items] == response_uris(path)
    first = items[0]
    assert first.url == "https://www.semanticscholar.org/research/research-team"
    assert first.source == "warc:sample-0000.warc.gz"
    assert first.fetched_at == datetime(2024, 4, 25, 16, 24, 44, tzinfo=UTC)
    assert "Semantic Scholar" in first.text

    other = read(web / "dolma" / "sample-0001.warc.gz")
    assert outcomes(other) == Counter(ok=15)
    # allenai.org/ was fetched three times; the reader keeps all three (dedup is a later stage).
    assert [d.url for d in other].count("https://allenai.org/") == 3


def test_multilingual_common_crawl_responses_decode(web: Path, extractor) -> None:
    items = read(web / "resiliparse" / "warcfile.warc.gz", extractor)
    assert len(items) == 16 and all(isinstance(d, Document) for d in items)
    by_url = {d.url: d for d in items}
    russian = by_url["http://01spb.ru/company/"]  # windows-1251
    assert russian.reject_reason is None
    assert "пожарной безопасности" in russian.text
    dutch = by_url["http://0900-hovenier.nl/gelderland/oosterbeek/"]
    assert "Hovenier in Oosterbeek" in dutch.text
    chinese = by_url["http://0760.jxtdw.com/area/sanxiang/"]  # gb2312
    assert "中山英才网" in chinese.text
    assert russian.fetched_at == datetime(2020, 8, 8, 18, 31, 12, tzinfo=UTC)
    for doc in kept(items):
        assert "\ufffd" not in doc.text, doc.url


def test_clueweb_quirks_every_record_accounted_for(web: Path, extractor) -> None:
    path = web / "resiliparse" / "clueweb-quirk.warc.gz"
    items = read(path, extractor)
    # WARC/0.18, a warcinfo and 29 responses; no record is lost or malformed.
    assert len(items) == 29 == len(response_uris(path))
    assert [d.url for d in items] == response_uris(path)
    assert outcomes(items) == Counter(ok=29)
    first = items[0]
    # WARC-Date is "2008-10-294T05:21:46-0700", not a date: the HTTP Date header is used.
    assert first.fetched_at == datetime(2009, 1, 28, 17, 5, 56, tzinfo=UTC)
    # EUC-JP, under a "Content-Encoding: gzip" header that is not true (the body is plain).
    assert "ブラウニー ブリーフケース" in first.text
    assert all("ポーター" in d.text and "\ufffd" not in d.text for d in items)


def test_archive_pages_extracted_several_at_once_come_out_the_same(web: Path, extractor) -> None:
    """The reader keeps pages in flight in the extractor's pool: the same outcomes, in order."""
    with BoundedExtractor(workers=3) as pool, BoundedExtractor(workers=1) as one:
        for name in ("warcfile.warc.gz", "clueweb-quirk.warc.gz"):
            path = web / "resiliparse" / name
            in_pool = [(d.url, d.reject_reason, d.text) for d in read(path, pool)]
            one_by_one = [(d.url, d.reject_reason, d.text) for d in read(path, one)]
            assert in_pool == one_by_one and len(in_pool) > 10
        assert len(pool.pids) > 1


def test_warcio_samples_revisit_chunked_and_arc(web: Path, extractor) -> None:
    example = read(web / "warcio" / "example.warc.gz", extractor)
    # two warcinfo, a response, a revisit and two requests: one document.
    assert outcomes(example) == Counter(ok=1)
    assert example[0].url == "http://example.com/"
    assert "This domain is established to be used for illustrative examples" in example[0].text

    chunked = read(web / "warcio" / "example-iana.org-chunked.warc", extractor)
    assert outcomes(chunked) == Counter(ok=1)
    assert "Management of the DNS Root Zone" in chunked[0].text
    assert not re.search(r"(?m)^[0-9a-f]{2,4}\r?$", chunked[0].text)  # no chunk sizes left in

    arc = read(web / "warcio" / "example.arc.gz", extractor)
    assert outcomes(arc) == Counter(ok=1)
    assert arc[0].source == "arc:example.arc.gz"
    assert arc[0].url == "http://example.com/"
    assert arc[0].fetched_at == datetime(2014, 2, 16, 5, 2, 21, tzinfo=UTC)
    assert arc[0].text == example[0].text


def test_same_page_as_warc_and_wet(web: Path, extractor) -> None:
    (warc,) = read(web / "whirlwind" / "whirlwind.warc.gz", extractor)
    (wet,) = read(web / "whirlwind" / "whirlwind.warc.wet.gz", extractor)
    assert warc.url == wet.url == "https://an.wikipedia.org/wiki/Escopete"
    assert wet.source == "wet:whirlwind.warc.wet.gz"
    assert wet.fetched_at == warc.fetched_at == datetime(2024, 5, 18, 1, 58, 10, tzinfo=UTC)
    assert wet.text.startswith("Escopete - Biquipedia, a enciclopedia libre\n")
    ours = set(re.findall(r"\w+", warc.text.lower()))
    theirs = set(re.findall(r"\w+", wet.text.lower()))
    # Common Crawl's WET keeps menus and footers; our extraction keeps the article. Most of what
    # we keep is in theirs.
    assert len(ours & theirs) / len(ours) > 0.8


def test_dolma_jsonl(web: Path) -> None:
    path = web / "dolma" / "cc_en_head-0091.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        expected = [json.loads(line) for line in f]
    items = read(path)
    assert outcomes(items) == Counter(ok=10)
    assert [d.text for d in items] == [r["text"] for r in expected]
    # Dolma keeps the URL under metadata.url and the crawl date in "created".
    assert [d.url for d in items] == [r["metadata"]["url"] for r in expected]
    assert (
        items[0].url
        == "http://100kinvesting.com/2016/11/28/first-teleconference-calls-invoice-factoring/"
    )
    assert items[0].fetched_at == datetime(2020, 3, 29, 9, 4, 10, tzinfo=UTC)
    assert items[0].source == "jsonl:cc_en_head-0091.jsonl.gz"


# ---------------------------------------------------------------------------------------------
# Damaged archives


def test_truncated_warc_gz_yields_a_rejection_not_a_crash(web: Path, tmp_path: Path) -> None:
    data = (web / "dolma" / "sample-0000.warc.gz").read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    items = read(cut)
    assert outcomes(items) == Counter(ok=13, malformed_record=1)
    broken = items[-1]
    assert (
        broken.url == "https://maria-antoniak.github.io/2018/11/19/data-science-crash-course.html"
    )
    assert "truncated record" in broken.detail and broken.text == ""
    assert [d.url for d in items] == response_uris(web / "dolma" / "sample-0000.warc.gz")[:14]


def test_truncated_uncompressed_and_whole_file_gzip(web: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((web / "dolma" / "sample-0000.warc.gz").read_bytes())
    cut = tmp_path / "cut.warc"
    cut.write_bytes(raw[: len(raw) // 2])
    assert outcomes(read(cut)) == Counter(ok=14, malformed_record=1)

    # gzip over the whole file (not one member per record): warcio refuses it, we read it.
    whole = tmp_path / "whole.warc.gz"
    whole.write_bytes(gzip.compress(raw))
    assert [d.url for d in read(whole)] == response_uris(web / "dolma" / "sample-0000.warc.gz")

    whole_cut = tmp_path / "whole-cut.warc.gz"
    whole_cut.write_bytes(gzip.compress(raw)[:100_000])
    items = read(whole_cut)
    assert items[-1].reject_reason == "malformed_record"
    assert outcomes(items)["malformed_record"] == 1 and outcomes(items)["ok"] >= 10


def test_damaged_records_in_the_middle_are_skipped_and_reading_goes_on(
    web: Path, tmp_path: Path
) -> None:
    path = web / "dolma" / "sample-0000.warc.gz"
    data = path.read_bytes()
    members = gzip_members(data)
    assert len(members) == 48
    uris = response_uris(path)

    # Junk between two gzip members (record 11 is a request: no document is lost).
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(data[: members[10]] + b"GARBAGE\r\n\r\n" + data[members[10] :])
    items = read(junk)
    assert outcomes(items) == Counter(ok=22, malformed_record=1)
    assert "GARBAGE" in next(d for d in items if d.reject_reason).detail

    # One flipped byte inside each of three responses' compressed data: each of those responses
    # is rejected (short, or its member unreadable) and every other response still comes out.
    damaged = bytearray(data)
    for record in (4, 20, 36):  # 0-based record indexes of three response records
        damaged[(members[record] + members[record + 1]) // 2] ^= 0xFF
    flipped = tmp_path / "flipped.warc.gz"
    flipped.write_bytes(bytes(damaged))
    items = read(flipped)
    assert outcomes(items) == Counter(ok=19, malformed_record=3)
    assert [d.url for d in items if d.reject_reason is None] == [
        u for i, u in enumerate(uris) if i not in (1, 9, 17)
    ]

    # A record header that is not WARC at all, as its own gzip member.
    bad = gzip.compress(
        b"WARX/1.0\r\nWARC-Type: response\r\nContent-Length: 5\r\n\r\nhello\r\n\r\n"
    )
    header = tmp_path / "header.warc.gz"
    header.write_bytes(data[: members[10]] + bad + data[members[10] :])
    assert outcomes(read(header)) == Counter(ok=22, malformed_record=1)


def test_uncompressed_warc_with_junk_resynchronises(web: Path, tmp_path: Path) -> None:
    raw = gzip.decompress((web / "dolma" / "sample-0000.warc.gz").read_bytes())
    junk = tmp_path / "junk.warc"
    junk.write_bytes(raw.replace(b"\r\n\r\nWARC/1.0", b"\r\n\r\nGARBAGE\r\nWARC/1.0", 3))
    assert outcomes(read(junk)) == Counter(ok=22, malformed_record=3)


def test_not_an_archive_at_all(tmp_path: Path) -> None:
    fake = tmp_path / "page.warc"
    fake.write_text("<html>not a warc</html>\n")
    (item,) = read(fake)
    assert item.reject_reason == "malformed_record" and item.url is None
    assert "page.warc" in item.detail
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    assert read(empty) == []


# ---------------------------------------------------------------------------------------------
# Records of every kind, written here with warcio


def write_warc(path: Path, records: list[tuple[str, str, list[tuple[str, str]], bytes]]) -> None:
    """records: (type, status line or '' for none, HTTP headers, body)."""
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i, (kind, status, headers, body) in enumerate(records):
            if kind == "request":
                http = StatusAndHeaders("GET / HTTP/1.1", headers, is_http_request=True)
            else:
                http = StatusAndHeaders(status, headers, protocol="HTTP/1.1") if status else None
            record = writer.create_warc_record(
                f"http://site.test/{i}",
                kind,
                payload=io.BytesIO(body),
                http_headers=http,
                warc_content_type={"conversion": "text/plain", "resource": "text/html"}.get(kind),
                warc_headers_dict={"WARC-Date": "2024-01-02T03:04:05Z"},
            )
            writer.write_record(record)
            record.raw_stream.close()  # warcio spools the payload to a temporary file


def test_response_outcomes(tmp_path: Path) -> None:
    html = [("Content-Type", "text/html; charset=utf-8")]
    path = tmp_path / "kinds.warc.gz"
    write_warc(
        path,
        [
            ("response", "200 OK", html, "<p>Grüße aus Köln</p>".encode()),
            ("response", "404 Not Found", html, b"<p>gone</p>"),
            ("response", "301 Moved", [("Location", "http://site.test/x")], b""),
            ("response", "200 OK", [("Content-Type", "image/png")], b"\x89PNG\r\n"),
            ("response", "200 OK", [("Content-Type", "text/plain; charset=latin-1")], b"caf\xe9"),
            ("response", "200 OK", html, b"<html><body>   </body></html>"),
            ("response", "200 OK", html, b"<p>" + b"x" * 2000 + b"</p>"),
            ("response", "200 OK", [("Content-Type", "text/html")], b"\x00\x01\x02\xff" * 64),
            ("request", "", [], b""),
            ("resource", "", [], b"<p>a resource</p>"),
        ],
    )
    items = read(path, max_page_bytes=1000)
    assert [type(i).__name__ for i in items] == [
        "Document",
        "FetchFailure",
        "FetchFailure",
        "FetchFailure",
        "Document",
        "Document",
        "Document",
        "Document",
        "Document",
    ]
    ok, not_found, moved, png, latin, empty, big, binary, resource = items
    assert ok.text == "Grüße aus Köln" and ok.source == "warc:kinds.warc.gz"
    assert ok.fetched_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (not_found.reason, not_found.status, not_found.url) == (
        "http_404",
        404,
        "http://site.test/1",
    )
    assert (moved.reason, moved.detail) == ("http_301", "Location: http://site.test/x")
    assert (png.reason, png.detail) == ("content_type_not_allowed", "image/png")
    assert latin.text == "café" and latin.reject_reason is None
    assert empty.reject_reason == "empty"
    assert (big.reject_reason, big.text) == ("oversize", "")
    assert binary.reject_reason in {"binary_content", "undecodable"} and binary.text == ""
    # A resource record (no HTTP envelope) with an allowed type is a page too; the request is not.
    assert (resource.text, resource.url) == ("a resource", "http://site.test/9")


def test_body_cut_by_the_crawler_mid_character_still_decodes(tmp_path: Path) -> None:
    # Common Crawl stores at most 1 MiB of a body and marks the record WARC-Truncated: the cut
    # can split a UTF-8 character, which strict decoding would otherwise reject.
    body = ("<p>" + "Café au lait. " * 20 + "é").encode()[:-1]
    path = tmp_path / "cut-body.warc.gz"
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        http = StatusAndHeaders(
            "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
        )
        record = writer.create_warc_record(
            "http://site.test/cut",
            "response",
            payload=io.BytesIO(body),
            http_headers=http,
            warc_headers_dict={"WARC-Truncated": "length"},
        )
        writer.write_record(record)
        record.raw_stream.close()
    (doc,) = read(path)
    assert doc.reject_reason is None
    assert doc.text == ("Café au lait. " * 20).strip()


def test_extraction_error_becomes_a_rejection(tmp_path: Path) -> None:
    path = tmp_path / "one.warc.gz"
    write_warc(path, [("response", "200 OK", [("Content-Type", "text/html")], b"<p>hi</p>")])
    (doc,) = read(path, TimingOut())
    assert (doc.reject_reason, doc.detail, doc.text) == ("extract_cpu_timeout", "over 0.1 s", "")
    assert doc.url == "http://site.test/0"


def test_wet_conversion_records(tmp_path: Path) -> None:
    path = tmp_path / "small.warc.wet.gz"
    write_warc(
        path,
        [
            ("warcinfo", "", [], b"software: test\r\n"),
            ("conversion", "", [], "Première ligne\nSecond line\n".encode()),
            ("conversion", "", [], b"bad \xff\xfe utf-8"),
            ("conversion", "", [], b"   \n"),
        ],
    )
    good, bad, blank = read(path)
    assert (good.text, good.source) == ("Première ligne\nSecond line\n", "wet:small.warc.wet.gz")
    assert good.url == "http://site.test/1"
    assert (bad.reject_reason, bad.text) == ("undecodable", "")
    assert blank.reject_reason == "empty"


# ---------------------------------------------------------------------------------------------
# Plain files


def test_txt_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line\r\nZweite Zeile: Größe\r\n".encode("utf-8"))
    (doc,) = read(path)
    assert doc.text == "First line\nZweite Zeile: Größe\n"
    assert doc.url == path.as_uri() and doc.source == "file"
    assert abs(doc.fetched_at.timestamp() - path.stat().st_mtime) < 1

    big = tmp_path / "big.txt"
    big.write_text("x" * 2000)
    (rejected,) = read(big, max_page_bytes=1000)
    assert (rejected.reject_reason, rejected.text) == ("oversize", "")


def test_html_file(tmp_path: Path, extractor) -> None:
    path = tmp_path / "page.html"
    paragraph = (
        "The reader decodes the bytes with the charset the page declares, then hands the markup"
        " to the extractor, which keeps the main text and drops navigation."
    )
    path.write_bytes(
        (
            "<html><head><meta charset='windows-1252'><title>T</title></head><body>"
            f"<nav><a href='/'>Home</a></nav><article><h1>Überschrift</h1><p>{paragraph}</p>"
            f"<p>{paragraph} Déjà vu.</p></article></body></html>"
        ).encode("cp1252")
    )
    (doc,) = read(path, extractor)
    assert doc.reject_reason is None and doc.source == "file"
    assert "Déjà vu." in doc.text and paragraph in doc.text


def test_jsonl_with_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps(
            {"text": "first", "url": "http://a.test/", "fetched_at": "2023-05-06T07:08:09Z"}
        ),
        "{not json",
        json.dumps({"url": "http://b.test/"}),
        json.dumps({"text": 42}),
        "",
        json.dumps(["text"]),
        json.dumps({"text": "ünïcödé ✓", "id": "x", "created": "2020-01-01"}),
        json.dumps({"text": "y" * 3000}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = read(path, max_page_bytes=1000)
    assert [d.reject_reason for d in items] == [
        None,
        "malformed_record",
        "malformed_record",
        "malformed_record",
        "malformed_record",
        None,
        "oversize",
    ]
    first, not_json, no_text, int_text, array, unicode, big = items
    assert (first.text, first.url) == ("first", "http://a.test/")
    assert first.fetched_at == datetime(2023, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert not_json.detail.startswith("line 2: not JSON")
    assert no_text.detail.startswith("line 3:") and no_text.url == "http://b.test/"
    assert int_text.detail.startswith("line 4:") and "int" in int_text.detail
    assert array.detail.startswith("line 6:")
    assert unicode.text == "ünïcödé ✓" and unicode.url is None
    assert unicode.fetched_at == datetime(2020, 1, 1, tzinfo=UTC)
    assert big.detail.startswith("line 8:")

    # The same lines gzipped, and a gzip cut short: lines before the cut, then one rejection.
    zipped = gzip.compress(path.read_bytes())
    (tmp_path / "docs.jsonl.gz").write_bytes(zipped)
    assert [d.text for d in read(tmp_path / "docs.jsonl.gz", max_page_bytes=1000)] == [
        d.text for d in items
    ]
    many = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000))
    cut = gzip.compress(many.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    items = read(tmp_path / "cut.jsonl.gz")
    assert items[-1].reject_reason == "malformed_record"
    assert all(d.reject_reason is None for d in items[:-1]) and len(items) > 100


def test_parquet(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(2500)]
    texts[1234] = None
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "url": [f"http://p.test/{i}" for i in range(2500)],
            "score": list(range(2500)),
        }
    )
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, row_group_size=700)
    items = read(path)
    assert len(items) == 2500
    assert outcomes(items) == Counter(ok=2499, malformed_record=1)
    assert items[1234].detail == "row 1235: text is null"
    assert (items[2499].text, items[2499].url) == ("row 2499", "http://p.test/2499")
    assert items[0].source == "parquet:docs.parquet"

    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), no_text)
    with pytest.raises(ValueError, match=r"no_text\.parquet.*body: string, n: int64"):
        read(no_text)

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-100])
    (item,) = read(broken)
    assert item.reject_reason == "malformed_record" and "broken.parquet" in item.detail


# ---------------------------------------------------------------------------------------------
# fsspec


def test_memory_filesystem(web: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/file-sources-{uuid.uuid4().hex}"
    try:
        fs.pipe(f"{root}/a/example.warc.gz", (web / "warcio" / "example.warc.gz").read_bytes())
        fs.pipe(f"{root}/b/notes.txt", b"hello from memory\n")
        fs.pipe(f"{root}/b/README", b"not a source")
        paths = expand_file_seed(f"memory://{root}")
        assert paths == [f"memory://{root}/a/example.warc.gz", f"memory://{root}/b/notes.txt"]
        assert expand_file_seed(f"memory://{root}/*/*.txt") == [f"memory://{root}/b/notes.txt"]
        warc, txt = (read(p) for p in paths)
        assert outcomes(warc) == Counter(ok=1) and warc[0].url == "http://example.com/"
        assert (txt[0].text, txt[0].url) == ("hello from memory\n", f"memory://{root}/b/notes.txt")
        with pytest.raises(FileNotFoundError, match="missing"):
            expand_file_seed(f"memory://{root}/missing")
    finally:
        fs.rm(root, recursive=True)


# ---------------------------------------------------------------------------------------------
# Untrusted seed folders


def test_a_symlink_out_of_a_seed_directory_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "home" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("password=hunter2\n")
    seeds = tmp_path / "seeds"
    (seeds / "sub").mkdir(parents=True)
    (seeds / "ok.txt").write_text("a document\n")
    (seeds / "sub" / "inner.txt").write_text("another\n")
    (seeds / "alias.txt").symlink_to(seeds / "sub" / "inner.txt")  # stays inside: fine
    assert len(expand_file_seed(str(seeds))) == 3
    (seeds / "sub" / "notes.txt").symlink_to(secret)
    for seed in (str(seeds), f"{seeds}/*/*.txt"):
        with pytest.raises(ValueError, match="does not follow links out of a seed directory") as e:
            expand_file_seed(seed)
        assert str(secret) in str(e.value) and "notes.txt" in str(e.value)
    # Named on its own, a link is the user's explicit choice.
    assert expand_file_seed(str(seeds / "sub" / "notes.txt")) == [str(seeds / "sub" / "notes.txt")]


def test_parquet_seed_without_text_is_refused_when_planned(tmp_path: Path) -> None:
    folder = tmp_path / "seeds"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["fine"]}), folder / "good.parquet")
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), folder / "bad.parquet")
    for seed in (folder, folder / "bad.parquet"):
        with pytest.raises(ValueError, match=r"bad\.parquet: needs a string column 'text'.*body"):
            expand_file_seed(str(seed))
    (folder / "bad.parquet").unlink()
    assert expand_file_seed(str(folder)) == [str(folder / "good.parquet")]


def test_lone_surrogate_line_is_read_and_the_good_lines_kept(tmp_path: Path) -> None:
    """JSON allows "\\ud800"; it decodes to a str nothing can store. The crawl stage replaces it
    (tests/test_stage_mechanism.py); here the reader must go on past it."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "before"}\n{"text": "half \\ud800 pair"}\n{"text": "after"}\n')
    items = read(path)
    assert [d.reject_reason for d in items] == [None, None, None]
    assert [d.text for d in items] == ["before", "half \ud800 pair", "after"]
