"""The pii detectors for numbers a checksum or a registry confirms: cards, IBANs, SSNs, IPs.

A digit run is everywhere in web text (prices, dates, versions, ISBNs, catalogue numbers), so a
pattern alone would redact far too much: a card number must pass Luhn and fall in an issuer's
range, an IBAN its country's length and mod 97, an SSN the SSA's ranges, an IP address
``ipaddress``'s parse (and, by default, be one that names a host on the internet). Each rule
says why it exists; the spans go to :mod:`llmflow.tasks.curate.pii_scanner`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

from llmflow.tasks.curate.pii_detectors import Span, search_around

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
    for m in search_around(text, _SSN_CUES, _SSN_CONTEXT, 4, 48):
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
