"""The detectors of the pii stage: a regex finds candidates, a validator decides.

Every detector returns :class:`Span` objects; :class:`PiiScanner` runs the enabled ones and keeps
a non-overlapping set. Each rule below says why it exists, because false positives (versions,
dates, hashes, prices, ISBNs) cost as much as misses: a redacted version number is corrupted
training text.

Overlaps are resolved by one deterministic rule: the span that starts first wins; at equal starts
the longer one; at equal extents the type listed first in ``PRIORITY``. Detectors that must win
over others make their spans start earlier: a private-key block spans from ``-----BEGIN``, so the
addresses and numbers inside it are never matched separately; a URL password's span covers the
whole ``scheme://user:password`` (only the password is replaced), so the ``password@host`` that
follows is never taken for an e-mail address; a credit card is longer than any phone number that
could be read inside it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from llmflow.tasks.curate.pii_phones import PHONE_REGIONS_BY_LANG, find_phones

# The counted types, in the order of the ``pii_counts`` struct's fields (fixed: never reorder).
PiiType = Literal["email", "phone", "ip_address", "credit_card", "iban", "ssn", "secret"]
PII_TYPES: tuple[PiiType, ...] = (
    "email",
    "phone",
    "ip_address",
    "credit_card",
    "iban",
    "ssn",
    "secret",
)
# Tie-break order for spans with the same start and end: the more specific type first.
PRIORITY: tuple[str, ...] = ("secret", "email", "credit_card", "iban", "ssn", "ip_address", "phone")
_RANK = {name: i for i, name in enumerate(PRIORITY)}


@dataclass(frozen=True, slots=True)
class Span:
    """One finding: ``text[start:end]`` becomes ``prefix + placeholder``.

    ``prefix`` keeps the part of the span that is not PII (the scheme and user of a URL whose
    password is replaced); ``pii_chars`` is how many characters were PII, for the
    stage's ``max_pii_fraction``. ``validated`` is False only for phone candidates replaced
    unchecked past the scan limit (see :func:`llmflow.tasks.curate.pii_phones.find_phones`).
    """

    start: int
    end: int
    kind: str
    prefix: str = ""
    validated: bool = True

    @property
    def pii_chars(self) -> int:
        return self.end - self.start - len(self.prefix)


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Earliest start, then longest, then ``PRIORITY``; a span overlapping a kept one is dropped."""
    kept: list[Span] = []
    last_end = -1
    for span in sorted(spans, key=lambda s: (s.start, -s.end, _RANK[s.kind])):
        if span.start >= last_end:
            kept.append(span)
            last_end = span.end
    return kept


# ---------------------------------------------------------------------------------------------
# e-mail
# ---------------------------------------------------------------------------------------------
# A dot-atom local part and a domain of at least two labels ending in an alphabetic TLD. Unicode
# letters are allowed (internationalized addresses). An apostrophe may join atoms like a dot does
# (RFC 5322 allows it: "john.o'reilly@example.ie"); it never starts the address, so a quote
# before one stays. The look-behind anchors matches at the start of a token. The pattern is only
# tried next to each '@' (local part <= 64, domain <= 253 chars, RFC 5321), so a long text with
# few '@' costs little.
_EMAIL = re.compile(
    r"(?<![\w.%+\-@])[\w%+\-]+(?:[.'\u2019][\w%+\-]+)*@"
    r"(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w\-@]|\.[^\W_])"
)
# Retina image names (icon@2x.png, logo@1.5x.jpg) have an e-mail's shape.
_RETINA = re.compile(r"@\d+(?:\.\d+)?x\.", re.IGNORECASE)


def _is_email(text: str, m: re.Match) -> bool:
    """Not an image name, and not the login in a URL ("https://user@host.com/": its password,
    if any, is the secret detector's)."""
    return not _RETINA.search(m.group()) and not text.endswith("://", 0, m.start())


def find_emails(text: str) -> Iterator[Span]:
    ats = text.count("@")
    if ats > len(text) // 256:
        # '@' everywhere (a dump, a chat log): one linear scan beats a search per '@'.
        for m in _EMAIL.finditer(text):
            if _is_email(text, m):
                yield Span(m.start(), m.end(), "email")
        return
    at = text.find("@") if ats else -1
    covered = 0
    while at >= 0:
        if at >= covered:
            found = _EMAIL.search(text, max(covered, at - 64), at + 254)
            if found is not None and found.start() < at < found.end():
                covered = found.end()
                if _is_email(text, found):
                    yield Span(found.start(), found.end(), "email")
        at = text.find("@", at + 1)


# ---------------------------------------------------------------------------------------------
# anchors: patterns are tried only where a literal they must contain occurs
# ---------------------------------------------------------------------------------------------
def _positions(text: str, needles: tuple[str, ...]) -> list[int]:
    """Sorted start offsets of every occurrence of any needle (str.find is far faster than a
    regex scan, and most needles never occur in a document)."""
    found: set[int] = set()
    for needle in needles:
        pos = text.find(needle)
        while pos >= 0:
            found.add(pos)
            pos = text.find(needle, pos + 1)
    return sorted(found)


def _match_at(text: str, needles: tuple[str, ...], pattern: re.Pattern[str]) -> Iterator[re.Match]:
    """Matches of a pattern that starts with one of the needles."""
    for pos in _positions(text, needles):
        m = pattern.match(text, pos)
        if m is not None:
            yield m


def _search_around(
    text: str, needles: tuple[str, ...], pattern: re.Pattern[str], before: int, after: int
) -> Iterator[re.Match]:
    """Matches that contain a needle, looked for between ``before`` chars before it and ``after``
    chars after it (a pattern's look-behind still sees the text before the search start)."""
    covered = 0
    for pos in _positions(text, needles):
        if pos < covered:
            continue
        m = pattern.search(text, max(covered, pos - before), pos + after)
        while m is not None and m.end() <= pos:
            m = pattern.search(text, m.end(), pos + after)
        if m is not None and m.start() <= pos:
            covered = m.end()
            yield m


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}\b")
_AWS_KEY_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA", "A3T")
# An AWS secret key is 40 base64 characters with no fixed prefix: only taken after a keyword.
_AWS_SECRET = re.compile(
    r"(?i:aws[\w.\- ]{0,24}?secret|secret[_\-. ]?access[_\-. ]?key)[\w\-. \"']{0,24}?"
    r"[:=>\s\"']{1,4}([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
_GITHUB = re.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"
    r"(?![A-Za-z0-9_])"
)
_GITHUB_PREFIXES = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
_SLACK = re.compile(r"(?<![A-Za-z0-9])(?:xox[baprs]|xapp)-[A-Za-z0-9\-]{10,250}")
_SLACK_PREFIXES = ("xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-", "xapp-")
# OpenAI/Anthropic style: "sk-", optional "proj-"/"ant-api03-"-like segments, a long random tail.
_SK_KEY = re.compile(r"(?<![\w\-])sk-[A-Za-z0-9_\-]{20,250}(?![\w\-])")
# Stripe: secret (sk_) and restricted (rk_) keys, live or test mode, and webhook signing secrets
# (whsec_) act on the account. Publishable keys (pk_) are made to be embedded in web pages: kept.
_STRIPE = re.compile(
    r"(?<![A-Za-z0-9_])(?:[sr]k_(?:live|test)_[A-Za-z0-9]{16,247}|whsec_[A-Za-z0-9+/=]{24,128})"
    r"(?![A-Za-z0-9_])"
)
_STRIPE_PREFIXES = ("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_")
# A JSON Web Token: base64url header and payload, both JSON objects (so both start "eyJ", the
# encoding of '{"'), and a signature. The header must decode to an object naming its "alg";
# an unsigned token (empty signature) authenticates nothing and is left.
_JWT = re.compile(
    r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,4096}\.eyJ[A-Za-z0-9_\-]{8,8192}"
    r"\.[A-Za-z0-9_\-]{16,1024}(?![A-Za-z0-9_\-]|\.[A-Za-z0-9_\-])"
)
# An opaque token after "Bearer" (an Authorization header, a curl -H line): random-looking (see
# _mixed), so "Bearer YOUR_TOKEN", "Bearer $TOKEN" and "Bearer <token>" stay.
_BEARER = re.compile(
    r"(?<![A-Za-z])(?i:bearer)[ \t]+([A-Za-z0-9\-._~+/]{20,4096}=*)(?![A-Za-z0-9\-._~+/=])"
)
_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# A truncated block (no END line): the header lines and base64 body that follow BEGIN.
_KEY_BODY = re.compile(r"(?:[ \t]*\r?\n[ \t]*(?:[A-Za-z0-9+/=]+|[\w\-]+:[^\n]*))*")
MAX_KEY_BLOCK = 65536  # an RSA-16384 key in PEM is ~12 KB: END is looked for this far, no more
_URL_PASSWORD = re.compile(
    r"(?<![\w+.\-])([A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s:/?#@\[\]<>\"']{1,256}:)"
    r"([^\s/?#@\[\]<>\"']{1,256})@(?=[\w\[])"
)
# Template and documentation stand-ins, not secrets: ****, <password>, ${DB_PASS}, {pw}, "password".
_PASSWORD_STANDIN = re.compile(
    r"\*+|x+|X+|\.+|<[^>]*>|\$\{?\w+\}?|\{\{?\s*\w+\s*\}?\}|%\(\w+\)s|"
    r"(?i:password|passwd|pass|pwd|secret|changeme|your[_\-]?password)"
)


def _mixed(token: str) -> bool:
    """Random keys mix digits, upper and lower case; words, slugs and hex hashes do not."""
    return (
        any(c.isdigit() for c in token)
        and any(c.isupper() for c in token)
        and any(c.islower() for c in token)
    )


def _some_mixed(token: str) -> bool:
    """At least two of digits, upper and lower case: what a random key has and a template
    stand-in ("sk_live_xxxxxxxxxxxxxxxx", "sk_test_0000000000000000") does not. Weaker than
    :func:`_mixed`, for formats whose prefix already says "key"."""
    return (
        any(c.isdigit() for c in token)
        + any(c.isupper() for c in token)
        + any(c.islower() for c in token)
    ) >= 2


def _jwt_valid(token: str) -> bool:
    """The header segment decodes to a JSON object with an "alg" member."""
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def find_secrets(text: str) -> Iterator[Span]:
    # The next END line is looked up once and reused, so many BEGIN lines without an END (a
    # truncated paste, a hostile page) cost one scan, not one scan each.
    covered, end, searched = 0, None, False
    for pos in _positions(text, ("-----BEGIN ",)):
        begin = _KEY_BEGIN.match(text, pos) if pos >= covered else None
        if begin is None:
            continue
        if not searched or (end is not None and end.start() < begin.end()):
            end, searched = _KEY_END.search(text, begin.end()), True
        if end is not None and end.start() - begin.end() <= MAX_KEY_BLOCK:
            covered = end.end()
        else:
            body = _KEY_BODY.match(text, begin.end())  # the pattern matches "": never None
            covered = body.end() if body is not None else begin.end()
        yield Span(begin.start(), covered, "secret")
    for pattern, prefixes in (
        (_AWS_KEY_ID, _AWS_KEY_PREFIXES),
        (_GITHUB, _GITHUB_PREFIXES),
        (_SLACK, _SLACK_PREFIXES),
    ):
        for m in _match_at(text, prefixes, pattern):
            yield Span(m.start(), m.end(), "secret")
    for m in _match_at(text, ("sk-",), _SK_KEY):
        if _mixed(m.group()):
            yield Span(m.start(), m.end(), "secret")
    for m in _match_at(text, _STRIPE_PREFIXES, _STRIPE):
        if _some_mixed(m.group().split("_", 2)[-1]):
            yield Span(m.start(), m.end(), "secret")
    for m in _match_at(text, ("eyJ",), _JWT):
        if _jwt_valid(m.group()):
            yield Span(m.start(), m.end(), "secret")
    for m in _match_at(text, ("Bearer", "bearer", "BEARER"), _BEARER):
        if _mixed(m.group(1)):
            yield Span(m.start(1), m.end(1), "secret")
    for m in _search_around(text, ("ecret", "ECRET"), _AWS_SECRET, 40, 120):
        if _mixed(m.group(1)):
            yield Span(m.start(1), m.end(1), "secret")
    for m in _search_around(text, ("://",), _URL_PASSWORD, 17, 520):
        if not _PASSWORD_STANDIN.fullmatch(m.group(2)):
            yield Span(m.start(), m.end(2), "secret", prefix=m.group(1))


# ---------------------------------------------------------------------------------------------
# credit cards
# ---------------------------------------------------------------------------------------------
# Look-behinds sit after the first character throughout: a pattern that starts with a plain
# character class lets the regex engine skip ahead to candidates (about 3x faster on prose).
_CARD = re.compile(r"[0-9](?<![\w\-.,][0-9])(?:[ \-]?[0-9]){12,18}(?![\w\-]|[.,][0-9])")
# (lowest prefix, highest prefix, allowed lengths): Visa, Mastercard, Amex, Discover, Diners, JCB,
# UnionPay, Maestro, Mir, RuPay. A Luhn-valid number outside these ranges is an ordinary number.
_IIN_RANGES: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({13, 16, 19})),
    (51, 55, frozenset({16})),
    (2221, 2720, frozenset({16})),
    (34, 34, frozenset({15})),
    (37, 37, frozenset({15})),
    (6011, 6011, frozenset(range(16, 20))),
    (644, 649, frozenset(range(16, 20))),
    (65, 65, frozenset(range(16, 20))),
    (300, 305, frozenset(range(14, 20))),
    (3095, 3095, frozenset(range(14, 20))),
    (36, 36, frozenset(range(14, 20))),
    (38, 39, frozenset(range(14, 20))),
    (3528, 3589, frozenset(range(16, 20))),
    (62, 62, frozenset(range(16, 20))),
    (81, 82, frozenset(range(16, 20))),
    (50, 50, frozenset(range(13, 20))),
    (56, 69, frozenset(range(13, 20))),
    (2200, 2204, frozenset(range(16, 20))),
)
# Card numbers are printed in fours (the last group shorter), or 4-6-5 (Amex) / 4-6-4 (Diners).
_CARD_GROUPS = re.compile(r"(?:\d{4}[ \-]){2,4}\d{1,4}|\d{4}[ \-]\d{6}[ \-]\d{4,5}")
_NEXT_GROUP = re.compile(r"[ \-](?=\d{4}(?:[ \-]|$))")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _known_iin(digits: str) -> bool:
    for low, high, lengths in _IIN_RANGES:
        width = len(str(low))
        if len(digits) in lengths and low <= int(digits[:width]) <= high:
            return True
    return False


def _card_valid(raw: str) -> bool:
    digits = raw.replace(" ", "").replace("-", "")
    if len(digits) != len(raw) and not _CARD_GROUPS.fullmatch(raw):
        return False
    return len(set(digits)) > 1 and luhn_valid(digits) and _known_iin(digits)


def find_credit_cards(text: str) -> Iterator[Span]:
    """A candidate that fails is retried from its next four-digit group, so a card preceded by
    other numbers in a row ("1234 5678 4111 1111 1111 1111") is still found."""
    m = _CARD.search(text)
    while m is not None:
        if _card_valid(m.group()):
            yield Span(m.start(), m.end(), "credit_card")
            m = _CARD.search(text, m.end())
            continue
        gap = _NEXT_GROUP.search(m.group())
        m = _CARD.search(text, m.start() + gap.end() if gap else m.end())


# ---------------------------------------------------------------------------------------------
# IBAN
# ---------------------------------------------------------------------------------------------
# IBAN length per country, from SWIFT's IBAN registry.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
_IBAN_START = re.compile(r"([A-Z](?<![A-Za-z0-9][A-Z])[A-Z])[0-9]{2}")
_IBAN_CHAR = re.compile(r" ?([A-Z0-9])")


def iban_valid(compact: str) -> bool:
    """ISO 13616: the country's length, then mod 97 of the rearranged number equals 1."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str) -> Iterator[Span]:
    for m in _IBAN_START.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1))
        if length is None:
            continue
        # Read exactly the country's length of characters, single spaces allowed between, so a
        # following upper-case word is never swallowed; the IBAN must end at a token boundary.
        chars, pos = [m.group()], m.end()
        while len("".join(chars)) < length:
            c = _IBAN_CHAR.match(text, pos)
            if c is None:
                break
            chars.append(c.group(1))
            pos = c.end()
        compact = "".join(chars)
        at_boundary = pos >= len(text) or not text[pos].isalnum()
        if len(compact) == length and at_boundary and iban_valid(compact):
            yield Span(m.start(), pos, "iban")


# ---------------------------------------------------------------------------------------------
# US social security numbers
# ---------------------------------------------------------------------------------------------
_SSN_DASHED = re.compile(
    r"([0-9](?<![\w\-.][0-9])[0-9]{2})-([0-9]{2})-([0-9]{4})(?![\w\-]|[.,][0-9])"
)
_SSN_CONTEXT = re.compile(
    r"(?i:\b(?:ssn|ss#|social[ \-]security(?:[ \-](?:number|no\.?|#))?)\b)[\s:#.\-]{0,4}"
    r"(?:is[ \t]+)?([0-9]{3})[ \-]?([0-9]{2})[ \-]?([0-9]{4})(?![\w\-]|[.,][0-9])"
)
_SSN_CUES = ("ssn", "SSN", "Ssn", "ss#", "SS#", "ocial", "OCIAL")
# Numbers the SSA voided after they were printed in advertising (invalid, but "SSNs" all the same
# would be over-eager: they are published examples).
_SSN_PUBLISHED = {("078", "05", "1120"), ("219", "09", "9999")}


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    return (
        area != "000"
        and area != "666"
        and area[0] != "9"
        and group != "00"
        and serial != "0000"
        and (area, group, serial) not in _SSN_PUBLISHED
    )


def find_ssns(text: str) -> Iterator[Span]:
    if "-" in text:
        for m in _SSN_DASHED.finditer(text):
            if ssn_valid(*m.groups()):
                yield Span(m.start(), m.end(), "ssn")
    for m in _search_around(text, _SSN_CUES, _SSN_CONTEXT, 4, 48):
        if ssn_valid(*m.groups()):
            yield Span(m.start(1), m.end(3), "ssn")


# ---------------------------------------------------------------------------------------------
# IP addresses
# ---------------------------------------------------------------------------------------------
_IPV4 = re.compile(r"[0-9](?<![\w.\-][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w\-]|\.[0-9])")
# Compressed IPv6 ("2001:db8::1", "::ffff:192.0.2.1") is only looked for around a "::"; the full
# eight-group form has no "::" and gets its own pattern. Times ("12:30:45") and MAC addresses
# (six groups) fail ipaddress's parse.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\w)"
)
_IPV6_FULL = re.compile(
    r"[0-9A-Fa-f](?<![\w:.][0-9A-Fa-f])[0-9A-Fa-f]{0,3}"
    r"(?::[0-9A-Fa-f]{1,4}){5}(?::[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}|:[0-9]{1,3}(?:\.[0-9]{1,3}){3})"
    r"(?![\w:]|\.\w)"
)
# Three colon-separated hex groups: where a full-form address can be (a regex that starts with a
# literal ':' scans prose much faster than one that starts on any hex letter).
_IPV6_RUN = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
# A dotted quad after one of these words is a version or section number ("version 1.2.3.4",
# "Firmware 2.0.1.12", "§ 1.2.3.4"), or a package pin ("pkg==1.2.3.4", "pkg@1.2.3.4").
_NUMBERING_CUE = re.compile(
    r"(?i:\b(?:v|ver|vers?ion|versions|release[sd]?|rel|build|rev|revision|firmware|update|patch"
    r"|python|node|java|kernel|chrome|firefox|section|sec|chapter|ch|clause|part|step|fig"
    r"|figure|table|item|no|isbn)\.?|§|==|>=|<=|~=|@)[ \t]*[:#]?[ \t]*$"
)
# Dotted quads of single digits ("2.9.0.5", "1.2.3.4", "4.0.0.1") are version numbers far more
# often than addresses; the public addresses of that shape are a few well-known resolvers
# (1.1.1.1, 8.8.8.8, 9.9.9.9) that identify nobody.
_SINGLE_DIGIT_QUAD = re.compile(r"\d\.\d\.\d\.\d")
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
# "user@<address>" after a remote-login command on the same line (ssh admin@192.168.10.24,
# scp f root@10.0.0.5:/tmp, rsync ...) or in a URL's login (ftp://bob:pw@10.0.0.5/): a login
# target, redacted even when private, since with the account it maps one machine of a network.
# Without either, "name@1.2.3.4" is more often a package pin (the "@" numbering cue above).
_LOGIN_USER = re.compile(r"(?<![\w.\-@])[\w.\-]{1,64}@$")
_URL_LOGIN = re.compile(
    r"[A-Za-z][A-Za-z0-9+.\-]{1,15}://[^\s:/?#@\[\]]{1,64}(?::[^\s/?#@]{1,256})?@$"
)
_REMOTE_LOGIN_CUE = re.compile(r"(?i:\b(?:ssh|scp|sftp|rsync|mosh|sshfs|ssh-copy-id|telnet)\b)")
# Addresses that stay even as a login target: they name no particular machine (loopback,
# unspecified, multicast) or are reserved for examples (RFC 5737 documentation blocks).
_LOGIN_KEPT = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
)


def _ip_counts(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, keep_non_global: bool) -> bool:
    """Whether an address is redacted: any valid one, or with ``keep_non_global`` only those that
    can name a host on the internet (IPv6: inside the global unicast block 2000::/3)."""
    if not keep_non_global:
        return True
    if ip.version == 6 and ip not in _V6_GLOBAL_UNICAST:
        return False
    return ip.is_global and not ip.is_multicast


def _ipv6_spans(text: str) -> Iterator[tuple[int, int]]:
    if "::" in text:
        pos, covered = text.find("::"), 0
        while pos >= 0:
            if pos >= covered:
                m = _IPV6.search(text, max(covered, pos - 40), pos + 48)
                if m is not None and m.start() <= pos < m.end():
                    covered = m.end()
                    yield m.start(), m.end()
            pos = text.find("::", pos + 2)
    if text.count(":") >= 6:
        for anchor in _IPV6_RUN.finditer(text):
            m = _IPV6_FULL.search(text, max(0, anchor.start() - 4), anchor.start() + 46)
            if m is not None and m.start() <= anchor.start() < m.end():
                yield m.start(), m.end()


def _is_login_target(text: str, start: int) -> bool:
    """Whether the address at ``start`` follows "user@" in a remote-login command's line, or
    "scheme://user@" / "scheme://user:password@" (a URL's login)."""
    if not text.endswith("@", 0, start):
        return False
    if _URL_LOGIN.search(text, max(0, start - 340), start):
        return True
    user = _LOGIN_USER.search(text, max(0, start - 66), start)
    if user is None:
        return False
    # The command is on the same line, at most 200 characters before the user.
    lo = max(0, user.start() - 200)
    lo = max(lo, text.rfind("\n", lo, user.start()) + 1)
    return _REMOTE_LOGIN_CUE.search(text, lo, user.start()) is not None


def find_ips(text: str, keep_non_global: bool) -> Iterator[Span]:
    if "." in text:
        for m in _IPV4.finditer(text):
            raw = m.group()
            try:
                ip = ipaddress.IPv4Address(raw)  # rejects octets > 255 and leading zeros
            except ValueError:
                continue
            if _is_login_target(text, m.start()):
                if not keep_non_global or not any(ip in net for net in _LOGIN_KEPT):
                    yield Span(m.start(), m.end(), "ip_address")
            elif (
                _ip_counts(ip, keep_non_global)
                and not _SINGLE_DIGIT_QUAD.fullmatch(raw)
                and not _NUMBERING_CUE.search(text, max(0, m.start() - 24), m.start())
            ):
                yield Span(m.start(), m.end(), "ip_address")
    for start, end in _ipv6_spans(text):
        try:
            ip6 = ipaddress.IPv6Address(text[start:end])
        except ValueError:
            continue
        if _ip_counts(ip6, keep_non_global):
            yield Span(start, end, "ip_address")


# ---------------------------------------------------------------------------------------------
# the scanner
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PiiScanner:
    """The enabled detectors with their settings; ``scan`` gives the non-overlapping spans.

    National-format phone numbers are read in the regions of the document's language
    (``phone_regions_by_lang``), then ``phone_regions``; the first region of each list anywhere
    in the text, the others only after a cue word (see :mod:`llmflow.tasks.curate.pii_phones`).
    """

    types: frozenset[str] = frozenset(PII_TYPES)
    phone_regions: tuple[str, ...] = ("US", "GB")
    phone_regions_by_lang: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(PHONE_REGIONS_BY_LANG)
    )
    phone_leniency: str = "strict_grouping"
    keep_service_numbers: bool = True
    keep_non_global_ips: bool = True
    max_phone_candidates: int | None = None

    def phone_plan(self, lang: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(regions read anywhere, regions read only after a cue) for a text in ``lang``."""
        by_lang = tuple(self.phone_regions_by_lang.get(lang or "", ()))
        anywhere = tuple(dict.fromkeys(by_lang[:1] + self.phone_regions[:1]))
        ordered = dict.fromkeys(by_lang + self.phone_regions)
        return anywhere, tuple(r for r in ordered if r not in anywhere)

    def _phones(self, text: str, lang: str | None) -> Iterator[Span]:
        anywhere, cued = self.phone_plan(lang)
        for start, end, validated in find_phones(
            text,
            anywhere,
            cued,
            self.phone_leniency,
            self.keep_service_numbers,
            self.max_phone_candidates,
        ):
            yield Span(start, end, "phone", validated=validated)

    def scan(self, text: str, lang: str | None = None) -> list[Span]:
        """The non-overlapping findings in ``text``; ``lang`` (ISO 639-1, the quality stage's
        ``lang``) picks the regions its national phone numbers are read in."""
        spans: list[Span] = []
        if not _HAS_MATERIAL(text):
            return spans
        detectors: list[tuple[str, Callable[[], Iterator[Span]]]] = [
            ("secret", lambda: find_secrets(text)),
            ("email", lambda: find_emails(text)),
            ("credit_card", lambda: find_credit_cards(text)),
            ("iban", lambda: find_ibans(text)),
            ("ssn", lambda: find_ssns(text)),
            ("ip_address", lambda: find_ips(text, self.keep_non_global_ips)),
            ("phone", lambda: self._phones(text, lang)),
        ]
        for kind, detect in detectors:
            if kind in self.types:
                spans.extend(detect())
        return resolve_overlaps(spans)


# What every finding contains at least one of; prose with none of them skips all detectors.
_HAS_MATERIAL = re.compile(
    r"[\d@]|-----BEGIN|gh[pousr]_|github_pat_|AKIA|ASIA|ABIA|ACCA|A3T|[sr]k_|whsec_|eyJ|(?i:bearer)"
).search


def redact(text: str, spans: list[Span], placeholder: str) -> str:
    """``text`` with each span replaced by its prefix and typed placeholder."""
    if not spans:
        return text
    parts: list[str] = []
    pos = 0
    for span in spans:
        parts.append(text[pos : span.start])
        parts.append(span.prefix + placeholder.format(type=span.kind.upper()))
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts)
