"""From the bytes of an HTTP body to text: BOM, declared charset, ``<meta>`` and detection,
each decoded strictly, and the binary sniffing that refuses what is not text at all.

The crawler and the file readers share this module so that a page read from a WARC file and the
same page fetched live decode to the same text.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["DecodeError", "PageRejected", "decode_body"]


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
