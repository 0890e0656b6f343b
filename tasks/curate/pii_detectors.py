"""What a pii finding is (:class:`Span`), and the detectors for e-mail addresses and secrets.

Each detector is a regex that finds candidates and a validator that decides, and each rule below
says why it exists, because false positives (versions, dates, hashes, prices, ISBNs) cost as much
as misses: a redacted version number is corrupted training text. Numbers confirmed by a checksum
or a registry (cards, IBANs, SSNs, IP addresses) are in :mod:`llmflow.tasks.curate.pii_numbers`,
phone numbers in :mod:`llmflow.tasks.curate.pii_phones`; :mod:`llmflow.tasks.curate.pii_scanner`
runs the enabled ones and resolves their overlaps.

Detectors that must win an overlap make their spans start earlier: a private-key block spans from
``-----BEGIN``, so the addresses and numbers inside it are never matched separately; a URL
password's span covers the whole ``scheme://user:password`` (only the password is replaced), so
the ``password@host`` that follows is never taken for an e-mail address.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

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
def positions(text: str, needles: tuple[str, ...]) -> list[int]:
    """Sorted start offsets of every occurrence of any needle (str.find is far faster than a
    regex scan, and most needles never occur in a document)."""
    found: set[int] = set()
    for needle in needles:
        pos = text.find(needle)
        while pos >= 0:
            found.add(pos)
            pos = text.find(needle, pos + 1)
    return sorted(found)


def match_at(text: str, needles: tuple[str, ...], pattern: re.Pattern[str]) -> Iterator[re.Match]:
    """Matches of a pattern that starts with one of the needles."""
    for pos in positions(text, needles):
        m = pattern.match(text, pos)
        if m is not None:
            yield m


def search_around(
    text: str, needles: tuple[str, ...], pattern: re.Pattern[str], before: int, after: int
) -> Iterator[re.Match]:
    """Matches that contain a needle, looked for between ``before`` chars before it and ``after``
    chars after it (a pattern's look-behind still sees the text before the search start)."""
    covered = 0
    for pos in positions(text, needles):
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
    for pos in positions(text, ("-----BEGIN ",)):
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
        for m in match_at(text, prefixes, pattern):
            yield Span(m.start(), m.end(), "secret")
    for m in match_at(text, ("sk-",), _SK_KEY):
        if _mixed(m.group()):
            yield Span(m.start(), m.end(), "secret")
    for m in match_at(text, _STRIPE_PREFIXES, _STRIPE):
        if _some_mixed(m.group().split("_", 2)[-1]):
            yield Span(m.start(), m.end(), "secret")
    for m in match_at(text, ("eyJ",), _JWT):
        if _jwt_valid(m.group()):
            yield Span(m.start(), m.end(), "secret")
    for m in match_at(text, ("Bearer", "bearer", "BEARER"), _BEARER):
        if _mixed(m.group(1)):
            yield Span(m.start(1), m.end(1), "secret")
    for m in search_around(text, ("ecret", "ECRET"), _AWS_SECRET, 40, 120):
        if _mixed(m.group(1)):
            yield Span(m.start(1), m.end(1), "secret")
    for m in search_around(text, ("://",), _URL_PASSWORD, 17, 520):
        if not _PASSWORD_STANDIN.fullmatch(m.group(2)):
            yield Span(m.start(), m.end(2), "secret", prefix=m.group(1))
