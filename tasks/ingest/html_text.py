"""From raw HTTP bodies to plain text: charset decoding, main-content extraction, link discovery.

The crawler and the archive readers share this module so that a page read from a WARC file and
the same page fetched live give the same document text.

Extraction runs third-party parsers on untrusted input, and those parsers have pathological
cases: in our measurements (bench/html_extractors.md) resiliparse needs 32 s for 50,000 nested
``<div>`` tags, and trafilatura more than 6 minutes for one tag with 200,000 attributes. Neither
library can be interrupted from Python while it is inside C code, so the crawler extracts through
:class:`BoundedExtractor`, which runs the extractor in a separate process it can kill.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import multiprocessing.connection
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from llmflow.tasks.ingest.html_links import extract_links

__all__ = [
    "DEFAULT_EXTRACTOR",
    "EXTRACTORS",
    "RESILIPARSE_OPTIONS",
    "TRAFILATURA_OPTIONS",
    "BoundedExtractor",
    "DecodeError",
    "ExtractionError",
    "decode_body",
    "extract_links",
    "html_to_text",
]

# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


class PageRejected(Exception):
    """A page that yields no text; readers reject it with ``reason`` (counted) and ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect and multiprocessing pickle exceptions; the default reduce would call
        # __init__ with the formatted message only.
        return (type(self), (self.reason, self.detail))


class DecodeError(PageRejected, ValueError):
    """A body that is not text at all (binary, or no charset decodes it)."""


# Checked longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)

# Formats that servers send with a text/html Content-Type often enough to matter (images behind
# a misconfigured CDN, compressed bodies served without Content-Encoding, PDFs). Every pattern is
# specific enough that no real text page starts with it.
_MAGIC: tuple[tuple[re.Pattern[bytes], str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), name)
    for pattern, name in (
        (rb"\x89PNG\r\n\x1a\n", "PNG image"),
        (rb"GIF8[79]a", "GIF image"),
        (rb"\xff\xd8\xff", "JPEG image"),
        (rb"RIFF....(WEBP|WAVE|AVI )", "RIFF media"),
        (rb"....ftyp", "MP4/HEIF media"),
        (rb"\x1a\x45\xdf\xa3", "Matroska/WebM media"),
        (rb"OggS\x00", "Ogg media"),
        (rb"ID3[\x02-\x04]", "MP3 audio"),
        (rb"wOF[F2]", "WOFF font"),
        (rb"\x1f\x8b\x08", "gzip data"),
        (rb"\x28\xb5\x2f\xfd", "zstd data"),
        (rb"\xfd7zXZ\x00", "xz data"),
        (rb"BZh[1-9]1AY&SY", "bzip2 data"),
        (rb"7z\xbc\xaf\x27\x1c", "7z archive"),
        (rb"Rar!\x1a\x07", "RAR archive"),
        (rb"PK\x03\x04|PK\x05\x06", "ZIP archive"),
        (rb"%PDF-", "PDF document"),
        (rb"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE/MS Office document"),
        (rb"SQLite format 3\x00", "SQLite database"),
        (rb"\x7fELF", "ELF executable"),
        (rb"\x00asm", "WebAssembly module"),
    )
)

# C0 controls that never occur in text: everything below 0x20 except TAB, LF, VT, FF, CR and ESC
# (ISO-2022-JP switches character sets with ESC sequences), plus DEL.
_CONTROL_BYTES = bytes(set(range(0x20)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}) + b"\x7f"
_SNIFF_BYTES = 8192  # git's binary heuristic looks at the same prefix
_MAX_CONTROL_SHARE = 0.10
_META_SCAN_BYTES = 4096

_CONTENT_TYPE_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([^\s"';,]+)""", re.IGNORECASE)
# One pattern for both <meta charset="x"> and <meta http-equiv=... content="...; charset=x">,
# plus the XML declaration of XHTML pages.
_META_CHARSET = re.compile(
    rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)"""
    rb"""|^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)""",
    re.IGNORECASE,
)

# WHATWG Encoding Standard: these labels mean windows-1252 to every browser, and pages labelled
# latin-1 routinely contain cp1252's curly quotes and dashes in 0x80-0x9F.
_WHATWG_1252_LABELS = {"iso8859-1", "ascii"}
# The five bytes cp1252 leaves undefined; the WHATWG decoder maps them to the C1 control of the
# same number instead of failing, which is what the registered error handler below does.
_CP1252_HOLES = frozenset(b"\x81\x8d\x8f\x90\x9d")


def _whatwg_1252_errors(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    chunk = error.object[error.start : error.end]
    if all(byte in _CP1252_HOLES for byte in chunk):
        return "".join(map(chr, chunk)), error.end
    raise error


codecs.register_error("llmflow-whatwg-1252", _whatwg_1252_errors)


def _codec_name(label: str | None) -> str | None:
    """Python's canonical name for a charset label, or None for a label Python does not know."""
    if not label:
        return None
    try:
        name = codecs.lookup(label.strip().strip("\"'")).name
    except (LookupError, ValueError):
        return None
    if name in _WHATWG_1252_LABELS:
        return "cp1252"
    return name


def _is_wide(codec: str) -> bool:
    return codec.startswith(("utf-16", "utf-32"))


@functools.lru_cache(maxsize=64)
def _is_single_byte(codec: str) -> bool:
    """True for charmap codecs (latin-1, cp1252, koi8-r...), which decode any byte sequence."""
    if codec.startswith("utf"):
        return False
    return len(bytes(range(256)).decode(codec, errors="replace")) == 256


def _strict_decode(body: bytes, codec: str) -> str | None:
    try:
        if codec == "cp1252":
            return body.decode("cp1252", errors="llmflow-whatwg-1252")
        return body.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def _nearly_decodes(body: bytes, codec: str) -> str | None:
    """The text, with U+FFFD for the few units that do not decode, when a BOM or a declared
    UTF-16/32 label leaves no doubt about the encoding: one unpaired surrogate in a UTF-16
    file is damaged text, not binary content (the NUL bytes of any UTF-16 text would otherwise
    send it to the binary sniffing). More than one bad unit per thousand characters: None."""
    try:
        text = body.decode(codec, errors="replace")
    except LookupError:
        return None
    bad = text.count("\ufffd") - body.decode(codec, errors="ignore").count("\ufffd")
    return text if bad <= max(1, len(text) // 1000) else None


def _binary_reason(body: bytes) -> str | None:
    for pattern, name in _MAGIC:
        if pattern.match(body):
            return f"starts like a {name}"
    sample = body[:_SNIFF_BYTES]
    if b"\x00" in sample:
        return f"NUL byte at offset {sample.index(0)}"
    # bytes.translate with a delete set counts the control bytes in C, without a Python loop.
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > _MAX_CONTROL_SHARE * len(sample):
        return f"{controls} of the first {len(sample)} bytes are control characters"
    return None


def _meta_charset(body: bytes) -> str | None:
    match = _META_CHARSET.search(body[:_META_SCAN_BYTES])
    if not match:
        return None
    codec = _codec_name((match.group(1) or match.group(2)).decode("ascii"))
    # The meta tag was readable as ASCII, so the page cannot be UTF-16/32 whatever it says;
    # the HTML standard's prescan turns such a label into UTF-8 for the same reason.
    if codec and _is_wide(codec):
        return "utf-8"
    return codec


def _detected_charset(body: bytes) -> str | None:
    from charset_normalizer import from_bytes

    matches = from_bytes(body)
    best = matches.best()
    if best is None:
        return None
    # On a tie charset_normalizer falls back on its language guess, which is weak on short texts:
    # it reads French cp1252 as cp1250 (è becomes č). Tied candidates decode the body equally
    # cleanly, so the prior decides: cp1252 is by far the most common legacy charset on the web.
    for match in matches:
        if match.encoding == "cp1252" and match.chaos - best.chaos < 0.01:
            return "cp1252"
    return _codec_name(best.encoding)


def decode_body(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Return (text, charset) for an HTTP body, or raise :class:`DecodeError`.

    Candidates are tried in order (BOM, Content-Type charset, ``<meta>``/XML declaration in the
    first 4 KB, charset_normalizer) and each is decoded strictly, because a wrong label is common
    on the web (a server default of utf-8 over a cp1252 page) and a lenient decode would hide it
    behind replacement characters. One deviation from the plain order: a single-byte label
    (latin-1, cp1252, ...) decodes any byte sequence, so it cannot be checked by decoding; when
    the body contains non-ASCII bytes that are valid UTF-8, UTF-8 wins, since text in a
    single-byte charset is practically never valid multi-byte UTF-8 by accident.

    An empty body decodes to ``""`` (with the header's charset, or utf-8): emptiness is the
    reader's business (it rejects short documents), not a decoding failure.
    """
    header_codec = _codec_name(_charset_param(content_type))
    if not body:
        return "", header_codec or "utf-8"

    for bom, bom_codec in _BOMS:
        if body.startswith(bom):
            text = _strict_decode(body[len(bom) :], bom_codec) or _nearly_decodes(
                body[len(bom) :], bom_codec
            )
            if text is not None:
                return text, bom_codec
            break

    if header_codec and _is_wide(header_codec):
        # UTF-16/32 text is full of NUL bytes: try it before the binary sniffing would refuse it.
        text = _strict_decode(body, header_codec) or _nearly_decodes(body, header_codec)
        if text is not None:
            return text, header_codec

    reason = _binary_reason(body)
    if reason:
        raise DecodeError("binary_content", reason)

    utf8_text: str | None = None
    if not body.isascii():
        utf8_text = _strict_decode(body, "utf-8")

    def candidates() -> Iterator[str | None]:  # lazily: detection is the expensive one
        if header_codec and not _is_wide(header_codec):
            yield header_codec
        yield _meta_charset(body)
        yield _detected_charset(body)

    tried: set[str] = set()
    for codec in candidates():
        if not codec or codec in tried:
            continue
        tried.add(codec)
        if utf8_text is not None and _is_single_byte(codec):
            return utf8_text, "utf-8"
        text = _strict_decode(body, codec)
        if text is not None:
            return text, codec
    if utf8_text is not None:
        return utf8_text, "utf-8"
    raise DecodeError(
        "undecodable",
        f"no charset decodes the {len(body)} bytes (tried {', '.join(sorted(tried)) or 'none'})",
    )


def _charset_param(content_type: str | None) -> str | None:
    if not content_type:
        return None
    match = _CONTENT_TYPE_CHARSET.search(content_type)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Bounded extraction in a worker process
# ---------------------------------------------------------------------------------------------

_WARMUP_HTML = (
    "<html><body><article><p>Warm-up paragraph for the extractor.</p></article></body></html>"
)

# The worker is a fresh interpreter that imports this module and nothing of the caller's.
# multiprocessing's spawn and forkserver methods would re-import the caller's __main__ script in
# the child, which re-runs any script without an ``if __name__ == "__main__":`` guard (a second
# crawl, a second pydoc server...). The channel is still multiprocessing's Connection, and the
# child gets the parent's sys.path the way spawn would give it.
_WORKER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from llmflow.tasks.ingest.html_text import _worker_entry; _worker_entry(sys.argv[2:])"
)
_PR_SET_PDEATHSIG = 1


def _vm_size_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _die_with_parent() -> None:
    """Linux: SIGKILL the worker when its parent dies, even mid-way through a slow page."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere the worker still exits at its next read, on end of file


def _worker_entry(argv: list[str]) -> None:
    extractor, memory_bytes, read_fd, write_fd, parent_pid = argv
    # trafilatura imports py3langid when it is installed (the quality stage needs it) and loads
    # its model (~130 MiB of address space) for a language check extraction never asks for.
    sys.modules.setdefault("py3langid", None)  # type: ignore[arg-type]
    _die_with_parent()
    if os.getppid() != int(parent_pid):  # the parent died before prctl took effect
        return
    inbox = multiprocessing.connection.Connection(int(read_fd), writable=False)
    outbox = multiprocessing.connection.Connection(int(write_fd), readable=False)
    _worker_main(inbox, outbox, extractor, int(memory_bytes))


def _worker_main(inbox: Any, outbox: Any, extractor: str, memory_bytes: int) -> None:
    """Loop of the extraction process: receive (html, url, want_links); answer ("links", links)
    first when asked for them, then ("ok", text) or ("error", reason, detail)."""
    # Ctrl-C goes to the whole process group; the parent decides what happens to the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Imports and the libraries' lazy initialisation happen before the limit, so the limit
    # bounds what a page costs rather than whether the worker can start.
    _extract(_WARMUP_HTML, extractor)
    baseline = _vm_size_bytes()
    if baseline is not None and baseline >= memory_bytes:
        outbox.send(("error", f"baseline address space {baseline >> 20} MiB already exceeds it"))
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    outbox.send(("ready", baseline))

    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        except MemoryError:
            # The rest of the message is still in the pipe: the stream is out of step, so answer
            # and exit; the parent starts a fresh worker.
            outbox.send(("error", "extract_memory", "out of memory receiving the page"))
            return
        if message is None:
            return
        html, url, want_links = message
        del message
        if want_links:
            # Links are parsed here too, not in the caller: lxml has pathological pages of its
            # own, and only this process can be stopped in the middle of one. Sent before the
            # text, so that a page whose text times out still leads to its links.
            try:
                links = extract_links(html, url) if url else []
            except Exception:  # MemoryError included: the page then has no links
                links = []
            outbox.send(("links", links))
        try:
            reply: tuple[Any, ...] = ("ok", _extract(html, extractor, url))
        except ExtractionError as error:
            reply = ("error", error.reason, error.detail)
        except MemoryError:  # raised outside the library call (e.g. while tidying the text)
            reply = ("error", "extract_memory", f"{extractor}: out of memory")
        except Exception as error:
            reply = ("error", "extract_failed", f"{extractor}: {error!r}"[:500])
        del html
        try:
            outbox.send(reply)
        except MemoryError:
            del reply
            outbox.send(("error", "extract_memory", "out of memory sending the text"))


class _Worker:
    """One worker process and its two pipe ends; what the finalizer needs, without the extractor."""

    def __init__(self, extractor: str, memory_bytes: int) -> None:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_CODE,
                    json.dumps(sys.path),
                    extractor,
                    str(memory_bytes),
                    str(to_worker_read),
                    str(from_worker_write),
                    str(os.getpid()),
                ],
                pass_fds=(to_worker_read, from_worker_write),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (to_worker_write, from_worker_read):
                os.close(fd)
            raise
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self.pid = self.process.pid
        self.outbox = multiprocessing.connection.Connection(to_worker_write, readable=False)
        self.inbox = multiprocessing.connection.Connection(from_worker_read, writable=False)
        self.owner_pid = os.getpid()
        self.ready = False

    def returncode(self, wait_s: float = 0.0) -> int | None:
        """Exit status (negative: killed by that signal), waiting up to ``wait_s`` for it."""
        if self.process is None:
            return None
        try:
            return self.process.wait(wait_s) if wait_s else self.process.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self, graceful: bool) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.owner_pid == os.getpid():  # a forked copy of the owner leaves the worker alone
            if graceful and self.ready and process.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    self.outbox.send(None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(1.0)
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self.outbox.close()
        self.inbox.close()


def _stop_worker(holder: list[_Worker | None]) -> None:
    """Finalizer: stop whichever worker the extractor has at the time."""
    worker = holder[0]
    if worker is not None:
        holder[0] = None
        worker.stop(graceful=False)


class BoundedExtractor:
    """html_to_text in one long-lived worker process, with a time and an address-space limit.

    Extraction libraries hang or balloon on pathological pages, inside C (and Rust) code that no
    Python-level timeout can interrupt, so the only reliable bound is a process that can be
    killed. One long-lived worker, rather than a process per page, keeps the start-up cost
    (~0.4 s: imports of lxml, trafilatura, resiliparse) off the per-page path; it is started
    in the constructor, without waiting, so it boots while the caller does other work.

    The worker is a fresh interpreter (as with multiprocessing's spawn: the crawler calls from
    threads, and forking a threaded process can deadlock the child on a lock another thread
    held), but started with ``python -c`` rather than through multiprocessing.Process, because
    spawn and forkserver re-run the caller's ``__main__`` script in the child when it lacks an
    ``if __name__ == "__main__":`` guard. Pages and texts travel over
    ``multiprocessing.connection`` pipes.

    ``memory_mb`` bounds the worker's whole address space (RLIMIT_AS), set after the libraries
    are imported and warmed up (about 60-70 MiB of address space for either backend on x86-64
    Linux), so a page can use roughly ``memory_mb`` minus that. The timeout counts from handing
    the page to the worker; worker start-up is bounded separately (``startup_timeout_s``).

    Failures: timeout -> ``extract_timeout`` (the worker is killed); out of memory in the worker
    (a MemoryError, lexbor's allocation error, or resiliparse's Rust code aborting on a failed
    allocation) -> ``extract_memory``; a worker that dies otherwise -> ``extract_failed``. In each
    case the worker is replaced at once, so the next page finds it (nearly) ready.
    """

    startup_timeout_s = 60.0

    def __init__(
        self, extractor: str = DEFAULT_EXTRACTOR, timeout_s: float = 10.0, memory_mb: int = 1024
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if memory_mb <= 0:
            raise ValueError("memory_mb must be positive")
        self.extractor = extractor
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._closed = False
        self._holder: list[_Worker | None] = [None]
        # Stops the worker if the extractor is garbage-collected or the interpreter exits
        # without close().
        self._finalizer = weakref.finalize(self, _stop_worker, self._holder)
        with self._lock:
            self._holder[0] = _Worker(extractor, memory_mb * 1024 * 1024)

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        worker = self._holder[0]
        return worker.pid if worker is not None else None

    def _replace_worker(self) -> None:
        if self._holder[0] is not None:
            self._holder[0].stop(graceful=False)
        self._holder[0] = _Worker(self.extractor, self.memory_mb * 1024 * 1024)

    def _ready_worker(self) -> _Worker:
        worker = self._holder[0]
        if (
            worker is None
            or worker.owner_pid != os.getpid()  # we are a forked copy of the owner
            or (worker.ready and worker.returncode() is not None)  # died between pages
        ):
            self._replace_worker()
            worker = self._holder[0]
            assert worker is not None
        if worker.ready:
            return worker
        try:
            message = worker.inbox.recv() if worker.inbox.poll(self.startup_timeout_s) else None
        except (EOFError, OSError):
            message = None
        if not message or message[0] != "ready":
            code = worker.returncode(1.0)
            self._holder[0] = None
            worker.stop(graceful=False)
            why = message[1] if message else f"exit code {code}"
            raise RuntimeError(
                f"the {self.extractor} extraction worker did not start "
                f"(memory_mb={self.memory_mb}): {why}"
            )
        worker.ready = True
        return worker

    def _fail(self, reason: str, detail: str) -> ExtractionError:
        """Replace the worker and return the error to raise."""
        worker = self._holder[0]
        code = worker.returncode(1.0) if worker is not None and reason == "extract_failed" else None
        self._replace_worker()
        if code == -signal.SIGABRT:
            # resiliparse 2 is Rust inside: a failed allocation under RLIMIT_AS aborts the process
            # ("memory allocation of N bytes failed") instead of raising MemoryError. Nothing else
            # in the worker aborts in practice, so this is the memory bound doing its job.
            reason = "extract_memory"
            detail = f"{detail}: aborted, a failed allocation (limit {self.memory_mb} MiB)"
        elif code is not None:
            detail = f"{detail} (exit code {code})"
        return ExtractionError(reason, detail)

    def extract(self, html: str, url: str | None = None) -> str:
        """Main-content text of one page, or :class:`ExtractionError`."""
        return self._run(html, url, want_links=False)[0]

    def extract_with_links(self, html: str, url: str) -> tuple[str, list[str]]:
        """(main-content text, absolute http(s) links) of one page, both parsed in the worker
        under the same timeout; :class:`ExtractionError` carries the links when the text fails
        after they were found."""
        return self._run(html, url, want_links=True)

    def _run(self, html: str, url: str | None, want_links: bool) -> tuple[str, list[str]]:
        with self._lock:
            if self._closed:
                raise RuntimeError("BoundedExtractor is closed")
            worker = self._ready_worker()
            reply: tuple[Any, ...] | None = None
            try:
                worker.outbox.send((html, url, want_links))
            except OSError:
                # The worker died while reading; it may have left a reply before exiting.
                try:
                    reply = worker.inbox.recv() if worker.inbox.poll(0.5) else None
                except (EOFError, OSError):
                    reply = None
                if reply is None:
                    raise self._fail("extract_failed", "worker died receiving the page") from None
            links: list[str] = []
            deadline = time.monotonic() + self.timeout_s  # links and text: one page, one bound
            while reply is None or reply[0] == "links":
                if reply is not None:
                    links = reply[1]
                if not worker.inbox.poll(max(0.0, deadline - time.monotonic())):
                    error = self._fail(
                        "extract_timeout", f"{self.extractor}: no result after {self.timeout_s} s"
                    )
                    error.links = links
                    raise error
                try:
                    reply = worker.inbox.recv()
                except (EOFError, OSError):
                    error = self._fail("extract_failed", "worker died during extraction")
                    error.links = links
                    raise error from None
            if reply[0] == "ok":
                return reply[1], links
            _, reason, detail = reply
            if reason == "extract_memory":
                # The libraries' state after a failed allocation is not trusted: fresh worker.
                error = self._fail(reason, f"{detail} (limit {self.memory_mb} MiB)")
            else:
                error = ExtractionError(reason, detail)
            error.links = links
            raise error

    def close(self) -> None:
        """Stop the worker (a polite request, then SIGKILL to its pid) and wait for it."""
        with self._lock:
            self._closed = True
            worker, self._holder[0] = self._holder[0], None
            if worker is not None:
                worker.stop(graceful=True)
            self._finalizer.detach()

    def __enter__(self) -> BoundedExtractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
