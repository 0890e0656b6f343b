"""The phone-number detector of the pii stage: cheap regex candidates, then phonenumbers.

A digit run is a phone number only if some country's numbering plan says so, read the way that
country writes it (:data:`LENIENCY`), and if how it is written rules out the other things digit
runs are (dates, ISBNs, amounts, ids; :func:`_phone_shaped`). Numbers in international form
(``+44 ...``, ``0044 ...``) are read for every country. A national number (``030 901820``) only
means something in its own country: it is read in the regions the caller gives, the first ones
anywhere in the text, the others only after a cue word (``Tel:``, ``Phone``, ``☎``), since a
digit group that is valid in one of several numbering plans is a phone number less often.

:class:`~llmflow.tasks.curate.pii_scanner.PiiScanner` turns the ``(start, end, validated)`` tuples
given here into its spans.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator, Mapping

import phonenumbers
from phonenumbers import Leniency, PhoneNumberType

# Where a phone number could be: 7+ digits joined by phone punctuation. Only the text around these
# goes to phonenumbers' matcher, so its cost follows the number of phone-shaped strings.
_PHONE_RUN = re.compile(r"[+(\d][\d \t\-./()\u00a0\u2010-\u2015]{5,}\d\)?")
_TOKEN = re.compile(r"[^ \t\u00a0]+")
_SEVEN_DIGITS = re.compile(r"(?:\d\D*){6}\d")
# The longest a written phone number gets is about 25 chars: 15 digits (E.164), "+", brackets,
# separators, an extension. Longer runs of numbers (table rows, lists) go to the matcher in
# chunks of at most this size that overlap by half, so every number lies whole in some chunk
# and no matcher call sees more than a few numbers.
_CHUNK_CHARS = 64
_CHUNK_OVERLAP = 32
# Context the matcher checks around a number: the character before (a letter or currency sign
# there rejects it) and, unless a space follows, a few after (a letter, ":30" making a time).
# No more: the matcher would read neighbouring numbers as part of the same one.
_PAD_AFTER = 4
# Words that announce a phone number, in the languages of PHONE_REGIONS_BY_LANG's first entries.
_PHONE_CUE = re.compile(
    r"(?i:\b(?:tel|tél|phone|telephone|call|fax|mobile|mob|cell|whatsapp|sms|hotline"
    r"|telefon|téléphone|teléfono|telefone|telefono|telefoon|mobil|handy|portable|móvil)\b|☎|📞)"
    r"[^\n\d]{0,12}$"
)
# Tokens that are something else, never part of a phone number: dates, decimals, dotted quads
# (IP addresses, versions), ISBN-13s, hyphenated ISBN-10s (four groups, ten characters, the last
# a lone check digit: "0-306-40615-2"; a phone's last group is longer), year ranges.
_NOT_PHONE_TOKEN = re.compile(
    r"\(?(?:\d{4}[\-./]\d{1,2}[\-./]\d{1,2}|\d{1,2}[\-./]\d{1,2}[\-./]\d{2,4}|\d+\.\d+"
    r"|\d{1,3}(?:\.\d{1,3}){3}|97[89](?:-?\d){10}"
    r"|(?=[\d\-]{12}[\dX](?![\dX\-]))\d{1,5}-\d{1,7}-\d{1,7}-[\dX]"
    r"|(?:1[5-9]|20)\d\d[\-\u2010-\u2015/](?:1[5-9]|20)\d\d)[.,;:)]?"
)
_THOUSANDS = re.compile(r"\d{1,3}(?:[ .\u00a0]\d{3})+")
# Numbers that reach an organisation, not a person, kept unless asked (see PiiConfig).
SERVICE_TYPES = frozenset(
    {
        PhoneNumberType.TOLL_FREE,
        PhoneNumberType.PREMIUM_RATE,
        PhoneNumberType.SHARED_COST,
        PhoneNumberType.UAN,
    }
)
LENIENCY = {
    "possible": Leniency.POSSIBLE,
    "valid": Leniency.VALID,
    "strict_grouping": Leniency.STRICT_GROUPING,
    "exact_grouping": Leniency.EXACT_GROUPING,
}


_ISBN_CUE = re.compile(r"(?i:\bisbn(?:-1[03])?)[ :]*$")


def _phone_shaped(raw: str, text: str, start: int) -> bool:
    """Rules the numbering plan cannot apply: how the number is written, and what precedes it.

    A number in international form (+...) is always a candidate. Otherwise: a bare digit run is a
    phone number only after a cue word ("tel", "call" ...), since order numbers, timestamps and
    ids are bare digit runs too; a date, a decimal ("31002.30"), a thousands-grouped amount
    ("3 456 789 012"), a year range, a dotted quad (an IP address or version) or an ISBN (by
    shape, or after "ISBN") is never one.
    """
    raw = raw.strip()
    if raw.startswith("+"):
        return True
    if _ISBN_CUE.search(text, max(0, start - 12), start):
        return False
    if raw.isdigit():
        return bool(_PHONE_CUE.search(text, max(0, start - 32), start))
    return not (_NOT_PHONE_TOKEN.fullmatch(raw) or _THOUSANDS.fullmatch(raw))


def _run_candidates(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of one run of numbers worth the matcher's time.

    The run is cut at tokens that cannot be part of a phone number, so "2024-01-15 10" or a line
    of IP addresses gives nothing, and at tabs and double spaces, which separate table columns and
    never occur inside a written number; what is left goes whole to the matcher when it is short,
    in overlapping chunks when it is long. A single token longer than a chunk ("1-1-1-1-...")
    holds no phone number.
    """
    tokens: deque[tuple[int, int]] = deque()

    def part(lo: int, hi: int) -> Iterator[tuple[int, int]]:
        raw = text[lo:hi]
        if _SEVEN_DIGITS.search(raw) and _phone_shaped(raw, text, lo):
            yield lo, hi

    for token in _TOKEN.finditer(text, start, end):
        t_start, t_end = token.span()
        if tokens and (t_start - tokens[-1][1] > 1 or text[t_start - 1] == "\t"):
            yield from part(tokens[0][0], tokens[-1][1])
            tokens.clear()
        if t_end - t_start > _CHUNK_CHARS or _NOT_PHONE_TOKEN.fullmatch(token.group()):
            if tokens:
                yield from part(tokens[0][0], tokens[-1][1])
                tokens.clear()
            continue
        if tokens and t_end - tokens[0][0] > _CHUNK_CHARS:
            chunk_end = tokens[-1][1]
            yield from part(tokens[0][0], chunk_end)
            while tokens and (
                tokens[0][0] < chunk_end - _CHUNK_OVERLAP or t_end - tokens[0][0] > _CHUNK_CHARS
            ):
                tokens.popleft()
        tokens.append((t_start, t_end))
    if tokens:
        yield from part(tokens[0][0], tokens[-1][1])


def phone_candidates(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of every part of the text that phonenumbers' matcher is run on."""
    for run in _PHONE_RUN.finditer(text):
        if _SEVEN_DIGITS.search(text, run.start(), run.end()):
            yield from _run_candidates(text, run.start(), run.end())


# Regions for a document's national-format numbers by its language (py3langid's ISO 639-1 codes,
# the quality stage's ``lang``): where the language is mostly written, most populous first. The
# "+1" plan is one for the US, Canada and the Caribbean, so "US" reads all of them.
PHONE_REGIONS_BY_LANG: Mapping[str, tuple[str, ...]] = {
    "en": ("US", "GB", "AU", "IN", "IE", "NZ", "ZA"),
    "de": ("DE", "AT", "CH"),
    "fr": ("FR", "BE", "CH", "CA", "LU"),
    "es": ("ES", "MX", "AR", "CO", "CL", "PE"),
    "it": ("IT", "CH"),
    "pt": ("BR", "PT"),
    "nl": ("NL", "BE"),
    "pl": ("PL",),
    "cs": ("CZ",),
    "sv": ("SE",),
    "da": ("DK",),
    "nb": ("NO",),
    "no": ("NO",),
    "fi": ("FI",),
    "el": ("GR",),
    "hu": ("HU",),
    "ro": ("RO",),
    "ru": ("RU",),
    "uk": ("UA",),
    "tr": ("TR",),
    "ja": ("JP",),
    "ko": ("KR",),
    "zh": ("CN", "TW", "HK"),
}
# "00" is the international call prefix of most of the world outside North America: "0044 20 7946
# 0958" is +44 20 7946 0958. Such numbers are read in a region whose prefix is 00, and only the
# matches that begin with it count from that reading (a national number there starts with one 0).
_IDD_00_REGION = "DE"


def find_phones(
    text: str,
    regions: tuple[str, ...],
    cued_regions: tuple[str, ...],
    leniency: str,
    keep_service_numbers: bool,
    max_candidates: int | None = None,
) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, validated)`` of each phone number: phonenumbers' matcher on a window around
    each candidate, in each of ``regions``, then (after a cue word) each of ``cued_regions``, then
    for a candidate that starts with "00" in a region that dials out with 00. A match counts for
    the candidate it overlaps (a neighbour inside the padding is found through its own window).

    The matcher costs ~75 us a run (a candidate in one region), so a document that is nothing but
    numbers (a 50 MB phone list: ~3 million) would take minutes. Past ``max_candidates`` runs,
    every remaining run of 7+ digits is replaced unchecked (``validated`` False) at regex speed:
    the stage rejects such a document, and its stored text then holds no number that might be
    one. Runs, not candidates, are counted, so cue words before every number (up to eight
    regions each) cannot stretch the time a document takes.
    """
    checked = 0
    seen: set[tuple[int, int]] = set()
    for run in _PHONE_RUN.finditer(text):
        if not _SEVEN_DIGITS.search(text, run.start(), run.end()):
            continue
        if max_candidates is not None and checked >= max_candidates:
            yield run.start(), run.end(), False
            continue
        for start, end in _run_candidates(text, run.start(), run.end()):
            if max_candidates is not None and checked >= max_candidates:
                yield start, run.end(), False
                break
            lo = max(0, start - 1)
            hi = end if end >= len(text) or text[end].isspace() else end + _PAD_AFTER
            window = text[lo:hi]
            passes = [(region, False) for region in regions]
            if cued_regions and _PHONE_CUE.search(text, max(0, start - 32), start):
                passes += [(region, False) for region in cued_regions]
            if text.startswith("00", start) and _IDD_00_REGION not in regions:
                passes.append((_IDD_00_REGION, True))
            for region, dialled_out in passes:
                checked += 1
                read = False
                for match in phonenumbers.PhoneNumberMatcher(
                    window, region, leniency=LENIENCY[leniency]
                ):
                    span = (lo + match.start, lo + match.end)
                    if dialled_out and not match.raw_string.startswith("00"):
                        continue
                    if span in seen or span[1] <= start or span[0] >= end:
                        continue
                    seen.add(span)
                    read = True
                    if not _phone_shaped(match.raw_string, text, span[0]):
                        continue
                    number_type = phonenumbers.number_type(match.number)
                    if keep_service_numbers and number_type in SERVICE_TYPES:
                        continue
                    yield span[0], span[1], True
                if read:  # the first region that reads the candidate decides it
                    break
