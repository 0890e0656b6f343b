"""pii: replace personal data and secrets with typed placeholders before text reaches training.

A model memorizes rare strings it sees in training and can repeat them: e-mail addresses, phone
numbers, card numbers and API keys in web text must not survive into the token stream. Each type
is found by a pattern and confirmed by a validator (phonenumbers' numbering plans, ``ipaddress``,
Luhn, IBAN mod 97, SSA ranges, key formats), because a redacted version number or date corrupts
text as surely as a missed e-mail leaks one; the rules are in
:mod:`llmflow.tasks.curate.pii_detectors` (e-mail, secrets), :mod:`llmflow.tasks.curate.pii_numbers`
(cards, IBANs, SSNs, IP addresses) and, for phone numbers, whose national formats follow the
document's language (its ``lang`` column), :mod:`llmflow.tasks.curate.pii_phones`;
:mod:`llmflow.tasks.curate.pii_scanner` runs them and resolves overlaps. Each rule that removes a
document returns a :class:`~llmflow.tasks.core.stage.Rejection`, and ``route`` counts and routes.

Every document is kept with its text redacted, except one that is mostly PII (a contact list, a
leaked dump, a key file): it goes to the rejected set with reason ``mostly_pii``, also redacted,
since rejected shards are stored and sampled into MLflow too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import phonenumbers
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, field_validator

from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    put_column,
    read_unit_input,
    route,
    run_unit,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.pii_detectors import MAX_KEY_BLOCK, PII_TYPES, PiiType
from llmflow.tasks.curate.pii_phones import PHONE_REGIONS_BY_LANG
from llmflow.tasks.curate.pii_scanner import PiiScanner, redact

STAGE = StageSpec(name="pii", version="2", libraries=("phonenumbers",))

# One int32 count per type, always all seven in PII_TYPES order, whatever is enabled: the column
# has the same type in every shard and every config.
PII_COUNTS_TYPE = pa.struct([pa.field(name, pa.int32(), nullable=False) for name in PII_TYPES])
PII_COUNTS_FIELD = pa.field("pii_counts", PII_COUNTS_TYPE)


def _regions(field: str, value: list[str]) -> list[str]:
    """Upper-cased region codes, each one phonenumbers has a numbering plan for."""
    regions = [region.upper() for region in value]
    unknown = [region for region in regions if region not in phonenumbers.SUPPORTED_REGIONS]
    if unknown:
        raise ValueError(
            f"{field}: {unknown} not regions phonenumbers knows (ISO 3166 alpha-2, e.g. 'US',"
            " 'GB', 'DE')"
        )
    return regions


class PiiConfig(StageConfig):
    """What counts as PII, how it is replaced, and when a document is too much PII to keep."""

    types: list[PiiType] = Field(
        default_factory=lambda: list(PII_TYPES),
        description="Types to detect and redact (default all). Disabled types count 0.",
    )
    placeholder: str = Field(
        "<{type}>",
        description=(
            "What replaces a finding; {type} becomes EMAIL, PHONE, IP_ADDRESS, CREDIT_CARD, IBAN,"
            " SSN or SECRET. Typed placeholders keep the sentence readable (the model learns an"
            " address goes there) without the address."
        ),
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB"],
        min_length=1,
        description=(
            "Regions (ISO 3166 alpha-2) whose national format is read for every document, after"
            " its language's (phone_regions_by_lang): the first anywhere in the text, the others"
            " only after a cue word (Tel, Phone, Fax, ☎ ...), since a digit group valid in one of"
            " several numbering plans is less often a phone number. Numbers in international"
            " form (+44 ..., 0044 ...) are read for every country regardless."
        ),
    )
    phone_regions_by_lang: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in PHONE_REGIONS_BY_LANG.items()},
        description=(
            "Regions for the national numbers of a document in each language (its lang column,"
            " ISO 639-1, from the quality stage), tried before phone_regions: the first anywhere"
            " ('030 901820' in a German text is a Berlin number), the others after a cue word."
            " A language not listed, or no lang column, uses phone_regions alone."
        ),
    )
    phone_leniency: Literal["possible", "valid", "strict_grouping", "exact_grouping"] = Field(
        "strict_grouping",
        description=(
            "phonenumbers' matcher leniency. 'strict_grouping': the number exists in its country's"
            " numbering plan and its digits are grouped as that country writes them. That leaves"
            " catalogue numbers that happen to be valid untouched ('289 460 939-2', a CD number in"
            " the NLTK movie reviews), and every real format in the tests still matches. 'valid'"
            " (the library's default) drops the grouping check; 'possible' only checks length."
        ),
    )
    keep_service_numbers: bool = Field(
        True,
        description=(
            "Leave toll-free, premium-rate, shared-cost and universal-access numbers (1-800 ...):"
            " they reach organisations, are published to be called, and identify no person."
        ),
    )
    keep_non_global_ips: bool = Field(
        True,
        description=(
            "Leave loopback (127.0.0.1), unspecified (0.0.0.0), private (10/8, 192.168/16,"
            " fc00::/7), link-local, documentation and multicast addresses: they name no host on"
            " the internet and fill tutorials and manuals. Global addresses are redacted."
        ),
    )
    max_pii_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Reject a document (reason mostly_pii) when more than this fraction of its characters"
            " are PII. Above one half, placeholders outweigh the language: what is left is a"
            " contact list or a dump, and would teach the model to emit runs of placeholders."
            " Short texts reach it sooner: 'Mail jane@example.com' is 76% PII."
            " 1.0 keeps every document."
        ),
    )
    max_phone_candidates: int = Field(
        100_000,
        ge=1,
        description=(
            "Phone-shaped numbers checked per document with phonenumbers, counted once per region"
            " tried (~75 us each, so at most ~8 s a document; most are tried in one region, a"
            " number after a cue word in up to eight). A document with more is a number dump,"
            " not prose: the rest are"
            " replaced unchecked and it is rejected (reason pii_scan_limit). A 50 MB text with"
            " dense numbers (dates, prices, ids every line) had ~27,000."
        ),
    )

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("types")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"types lists a type twice: {value}")
        return value

    @field_validator("placeholder")
    @classmethod
    def _placeholder_formats(cls, value: str) -> str:
        try:
            rendered = value.format(type="EMAIL")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"placeholder {value!r} must be a format string whose only field is {{type}}"
                f" ({error!r})"
            ) from None
        if "{type}" not in value or not rendered.strip():
            raise ValueError(f"placeholder {value!r} must contain {{type}}, e.g. '<{{type}}>'")
        return value

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, value: list[str]) -> list[str]:
        return _regions("phone_regions", value)

    @field_validator("phone_regions_by_lang")
    @classmethod
    def _known_lang_regions(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {
            lang.lower(): _regions(f"phone_regions_by_lang[{lang!r}]", regions)
            for lang, regions in value.items()
        }

    def scanner(self) -> PiiScanner:
        return PiiScanner(
            types=frozenset(self.types),
            phone_regions=tuple(self.phone_regions),
            phone_regions_by_lang={k: tuple(v) for k, v in self.phone_regions_by_lang.items()},
            phone_leniency=self.phone_leniency,
            keep_service_numbers=self.keep_service_numbers,
            keep_non_global_ips=self.keep_non_global_ips,
            max_phone_candidates=self.max_phone_candidates,
        )


@dataclass(frozen=True)
class Redaction:
    """One document's outcome: its redacted text, the count per type, how many characters of
    the original were PII, and how many phone candidates were replaced unchecked."""

    text: str
    counts: dict[str, int]
    pii_chars: int
    unchecked: int


def redact_text(
    text: str, config: PiiConfig, scanner: PiiScanner | None = None, lang: str | None = None
) -> Redaction:
    """Find and replace the PII of one text (``scanner``: the config's, built once per shard;
    ``lang``: the document's language, for its national phone numbers)."""
    spans = (scanner or config.scanner()).scan(text, lang)
    counts = Counter(span.kind for span in spans)
    return Redaction(
        text=redact(text, spans, config.placeholder),
        counts={name: counts.get(name, 0) for name in PII_TYPES},
        pii_chars=sum(span.pii_chars for span in spans),
        unchecked=sum(not span.validated for span in spans),
    )


# Past an excerpt's end, how much more of the text is scanned: as far as the detectors look for
# a key block's END line, so a block that starts in the excerpt is found as the stage finds it,
# and any other finding (a URL password, ~530 chars, is the longest) lies whole in it.
_EXCERPT_MARGIN = MAX_KEY_BLOCK + 1024


def redact_excerpt(
    text: str, max_chars: int, config: PiiConfig | None = None, lang: str | None = None
) -> str:
    """The first ``max_chars`` characters of ``text`` redacted as the pii stage redacts (with
    ``config``, default :class:`PiiConfig`), for text shown outside the curated data: the
    rejected samples of the stages before pii go to MLflow, and their text is raw.

    Only the start of the text is scanned (~65 KB), so a 50 MB rejected document costs what a
    page does; the scan reaches past the cut, so a finding that straddles it is replaced whole,
    never cut into a part the detectors no longer recognize ("jane.doe@exa").
    """
    config = config or PiiConfig()
    window = text[: max_chars + _EXCERPT_MARGIN]
    spans = [span for span in config.scanner().scan(window, lang) if span.start < max_chars]
    end = max([max_chars, *(span.end for span in spans)])
    return redact(window[:end], spans, config.placeholder)[:max_chars]


def _found(redaction: Redaction) -> str:
    return ", ".join(f"{k}={v}" for k, v in redaction.counts.items() if v)


def scan_limit_reached(redaction: Redaction, config: PiiConfig) -> Rejection | None:
    """A number dump: phone candidates past ``max_phone_candidates`` were replaced unchecked."""
    if not redaction.unchecked:
        return None
    return Rejection(
        "pii_scan_limit",
        f"more than max_phone_candidates={config.max_phone_candidates} phone-shaped"
        f" numbers; {redaction.unchecked} replaced unchecked ({_found(redaction)})",
    )


def mostly_pii(text: str, redaction: Redaction, config: PiiConfig) -> Rejection | None:
    """A contact list or a dump: more than ``max_pii_fraction`` of the characters were PII."""
    fraction = redaction.pii_chars / len(text) if text else 0.0
    if fraction <= config.max_pii_fraction:
        return None
    return Rejection(
        "mostly_pii",
        f"{fraction:.0%} of {len(text)} chars are PII ({_found(redaction)});"
        f" max_pii_fraction={config.max_pii_fraction}",
    )


def pii_documents(table: pa.Table, config: PiiConfig) -> ShardResult:
    """Redact every document of a shard; those mostly made of PII go to the rejected set."""
    scanner = config.scanner()
    stats: Counter[str] = Counter({f"pii_{name}": 0 for name in PII_TYPES})
    stats.update(documents_with_pii=0, documents_redacted=0, phone_candidates_unchecked=0)
    new_texts: list[str] = []
    all_counts: list[dict[str, int]] = []
    decisions: list[Rejection | None] = []
    texts = table.column("text").to_pylist()
    # The quality stage's language, where it ran before: it picks the national phone formats.
    langs = (
        table.column("lang").to_pylist() if "lang" in table.schema.names else [None] * len(texts)
    )
    for text, lang in zip(texts, langs, strict=True):
        text = text or ""
        result = redact_text(text, config, scanner, lang)
        new_texts.append(result.text)
        all_counts.append(result.counts)
        stats.update({f"pii_{name}": n for name, n in result.counts.items()})
        stats["phone_candidates_unchecked"] += result.unchecked
        found = sum(result.counts.values()) > 0
        stats["documents_with_pii"] += found
        decision = scan_limit_reached(result, config) or mostly_pii(text, result, config)
        stats["documents_redacted"] += found and decision is None
        decisions.append(decision)
    updated = put_column(table, table.schema.field("text"), pa.array(new_texts, pa.string()))
    # Run again on its own output, the stage's new counts replace the old.
    updated = put_column(updated, PII_COUNTS_FIELD, pa.array(all_counts, PII_COUNTS_TYPE))
    return route(updated, decisions, stats)


@task(name="pii-shard", cache_policy=NO_CACHE, persist_result=False)
def pii_shard(unit: WorkUnit, config: PiiConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: pii_documents(read_unit_input(unit), config))
