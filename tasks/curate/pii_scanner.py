"""The pii scanner: runs the enabled detectors on a text and keeps a non-overlapping set.

Overlaps are resolved by one deterministic rule: the span that starts first wins; at equal starts
the longer one; at equal extents the type listed first in ``PRIORITY``. Detectors that must win
over others make their spans start earlier (see :mod:`llmflow.tasks.curate.pii_detectors`); a
credit card is longer than any phone number that could be read inside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from llmflow.tasks.curate.pii_detectors import PII_TYPES, Span, find_emails, find_secrets
from llmflow.tasks.curate.pii_numbers import find_credit_cards, find_ibans, find_ips, find_ssns
from llmflow.tasks.curate.pii_phones import PHONE_REGIONS_BY_LANG, find_phones

# Tie-break order for spans with the same start and end: the more specific type first.
PRIORITY: tuple[str, ...] = ("secret", "email", "credit_card", "iban", "ssn", "ip_address", "phone")
_RANK = {name: i for i, name in enumerate(PRIORITY)}


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Earliest start, then longest, then ``PRIORITY``; a span overlapping a kept one is dropped."""
    kept: list[Span] = []
    last_end = -1
    for span in sorted(spans, key=lambda s: (s.start, -s.end, _RANK[s.kind])):
        if span.start >= last_end:
            kept.append(span)
            last_end = span.end
    return kept


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
