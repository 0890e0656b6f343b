"""What a user sets for the crawl stage: seeds, scope, politeness, limits, extraction bounds.

Kept apart from ``tasks/ingest/crawl.py`` so that the crawler, the archive readers and the stage
can all
import it without importing each other.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import ClassVar, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from llmflow.tasks.core.stage import StageConfig
from llmflow.tasks.ingest.web_scope import parse_scope_entry

# Modules that do something when imported. pydoc renders a module page by importing the module,
# so the embedded default never asks for these pages (the server runs in its own process as well).
PYDOC_UNSAFE_PAGES = [
    r"/antigravity\.html",  # opens a web browser
    r"/this\.html",  # prints the Zen of Python
    r"/__hello__\.html",
    r"/__phello__",  # print on import
    r"/idlelib\.(idle|pyshell|__main__)",  # start IDLE
    r"/turtledemo",  # opens windows
    r"/tkinter\.__main__",
    r"/(ensurepip|venv|pip|unittest|json\.tool|http\.server|calendar|site)\.__main__",
    r"/[^/]*__main__\.html",
    r"/(get|search)\?",  # the search form and its result pages: not content
]


def redact_url(url: str) -> str:
    """``url`` without its userinfo (``user:password@``), for anything stored or logged.

    A seed may carry HTTP basic-auth credentials; they are for the request only, and must not
    reach MLflow params, manifests, shard columns, WARC records or logs. Anything that is not a
    URL with a network location (a file path, ``pydoc:``) comes back unchanged, as does a string
    too malformed to split (it then holds no userinfo this function could find anyway: the
    ``@`` test below is on the raw string).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and parts.netloc and "@" in parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if parts is None and "@" in url and "://" in url:
        # Unsplittable (a bad IPv6 literal, say) yet possibly holding credentials: drop
        # everything between the scheme and the last "@" of the authority.
        scheme, _, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return url


def default_user_agent() -> str:
    return f"llmflow/{version('llmflow')} (language-model data crawler)"


class CrawlConfig(StageConfig):
    """Where documents come from and how politely they are fetched."""

    # How fast and how many at once changes no page's text: such changes redo no finished crawl.
    # The wall-clock backstop is here too: it trips only on a starved machine, never by design.
    # checkpoint_pages moves where a long crawl's parts are cut, never which documents it keeps.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "concurrency",
            "politeness_delay_s",
            "extract_workers",
            "extract_wall_s",
            "checkpoint_pages",
        }
    )

    seeds: list[str] = Field(
        default_factory=lambda: ["pydoc:", "installed:"],
        description=(
            "Where to start. http(s) URLs are crawled; local paths or fsspec URLs of .warc(.gz),"
            " .wet/.wet.gz, .txt, .html, .jsonl(.gz) or .parquet files (or directories or globs of"
            " them) are read; 'pydoc:' (or 'pydoc:<page>') starts Python's own documentation"
            " server on a free localhost port and crawls it; 'installed:' reads the descriptions"
            " and licence files of the installed Python packages. The last two are the embedded"
            " default: no network needed."
        ),
    )
    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description=(
            "Scope: URL prefixes ('https://example.com/docs/', or 'example.com/docs/' for both"
            " schemes) or host names ('example.com': any port and scheme; 'example.com:8080':"
            " that port only) the crawler may fetch. Empty means the seeds' hosts, each on its"
            " seed's port (a seed without a port: its scheme's default port, 80 or 443)."
        ),
    )
    allow_private_addresses: bool = Field(
        True,
        description=(
            "Fetch from hosts whose address is not globally routable (loopback, private,"
            " link-local such as 169.254.169.254, ...). True suits a laptop (the embedded pydoc"
            " site is on 127.0.0.1); a deployment crawling the open web sets False, so a link or"
            " redirect cannot reach internal services. Checked on the address actually connected"
            " to, so DNS rebinding does not get around it; env proxy settings are not used then."
        ),
    )
    exclude_patterns: list[str] = Field(
        default_factory=lambda: list(PYDOC_UNSAFE_PAGES),
        description="Regular expressions; a URL matching any of them is never fetched.",
    )
    max_pages: int = Field(200, ge=1, description="Stop after this many fetched pages.")
    max_depth: int = Field(5, ge=0, description="Links followed from a seed, at most.")
    max_page_bytes: int = Field(
        5_000_000, ge=1, description="A response body larger than this is rejected ('oversize')."
    )
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed per URL.")
    politeness_delay_s: float = Field(
        1.0,
        ge=0,
        description=(
            "Seconds between two requests to the same host (a longer robots.txt Crawl-delay wins)."
        ),
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once, over all hosts.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    read_timeout_s: float = Field(20.0, gt=0, description="Seconds to wait for the next bytes.")
    retries: int = Field(2, ge=0, description="Retries after a 5xx answer or a timeout.")
    retry_backoff_s: float = Field(
        0.5, ge=0, description="First retry waits this long; each further retry doubles it."
    )
    respect_robots_txt: bool = Field(True, description="Honour robots.txt (RFC 9309).")
    content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"],
        description="Media types kept; any other response is recorded as a fetch failure.",
    )
    user_agent: str = Field(
        default_factory=default_user_agent, description="User-Agent header and robots.txt agent."
    )
    extract_cpu_s: float = Field(
        10.0,
        gt=0,
        description=(
            "CPU seconds the HTML-to-text extraction of one page (text and links) may use; a page"
            " over it is rejected 'extract_cpu_timeout'. CPU time, not wall clock, so a loaded"
            " machine rejects no page that an idle one keeps."
        ),
    )
    extract_wall_s: float = Field(
        120.0,
        gt=0,
        description=(
            "Wall-clock backstop (seconds) for one page's extraction, for a worker that gets no"
            " CPU at all; a page over it is rejected 'extract_wall_timeout' (load, not the page)."
            " At least extract_cpu_s."
        ),
    )
    extract_workers: int = Field(
        0,
        ge=0,
        description=(
            "HTML-to-text worker processes per unit of work, at most (0: one per CPU core this"
            " process may use; each is started only when pages overlap). Units run at once"
            " (max_workers) each have their own: lower it when several units read WARC files."
        ),
    )
    extract_memory_mb: int = Field(
        1024,
        ge=128,
        description="Memory bound (MiB) of each HTML-to-text worker; about 70 MiB is its own.",
    )
    write_warc: bool = Field(
        True, description="Keep every HTTP response raw as WARC next to the shards, for replay."
    )
    shard_docs: int = Field(
        10_000,
        ge=1,
        description="Documents per output shard, at most: a big file or crawl is written as"
        " several shards as it is read, and each is one unit of work in every later stage.",
    )
    shard_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes (in memory) per output shard, at most: what bounds a unit's memory.",
    )
    checkpoint_pages: int = Field(
        1_000,
        ge=1,
        description="A web crawl writes its documents, page states and WARC file, then a"
        " checkpoint, every this many pages: a crawl killed or stopped (Ctrl-C) resumes from its"
        " last checkpoint, and memory holds one batch of pages. 1,000 keeps the embedded"
        " default's crawl (845 pages) one batch, written as before; a kill loses at most this"
        " many pages (about 17 minutes of one host at a 1 s politeness delay).",
    )
    web_partitions: int = Field(
        1,
        ge=1,
        description="Crawl the web seeds as this many units, each owning the hosts whose stable"
        " hash falls in it (politeness stays per host: no two units ever ask one host), so"
        " workers can share a crawl. A link to another unit's host is counted"
        " (links_to_other_partition) and left to that unit, which reaches it from its own"
        " seeds; max_pages and max_depth apply per unit. Keep it fixed across refreshes.",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds_given(cls, seeds: list[str]) -> list[str]:
        """No seeds means no source at all: a run that silently crawls nothing is a mistake."""
        if not seeds:
            raise ValueError(
                "no seeds: set crawl.seeds to at least one source (an http(s) URL, 'pydoc:',"
                " 'installed:', or a file path / fsspec URL)"
            )
        blank = [i for i, seed in enumerate(seeds) if not seed.strip()]
        if blank:
            raise ValueError(f"seed number {blank[0]} (counting from 0) is an empty string")
        return seeds

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes_parse(cls, prefixes: list[str]) -> list[str]:
        """A scope entry that cannot be read would silently match nothing (or too much)."""
        for entry in prefixes:
            parse_scope_entry(entry)
        return prefixes

    @model_validator(mode="after")
    def _wall_backstop_covers_the_cpu_budget(self) -> Self:
        """A backstop shorter than the budget would make the budget a wall-clock limit again."""
        if self.extract_wall_s < self.extract_cpu_s:
            raise ValueError(
                f"extract_wall_s ({self.extract_wall_s}) must be at least extract_cpu_s"
                f" ({self.extract_cpu_s}): it is a backstop for a starved worker, not the budget"
            )
        return self
