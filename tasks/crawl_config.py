"""What a user sets for the crawl stage: seeds, scope, politeness, limits, extraction bounds.

Kept apart from ``tasks/crawl.py`` so that the crawler, the archive readers and the stage can all
import it without importing each other.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import ClassVar

from pydantic import Field

from llmflow.tasks.stage import StageConfig

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


def default_user_agent() -> str:
    return f"llmflow/{version('llmflow')} (language-model data crawler)"


class CrawlConfig(StageConfig):
    """Where documents come from and how politely they are fetched."""

    # How fast and how many at once changes no page's text: such changes redo no finished crawl.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"concurrency", "politeness_delay_s"})

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
            "Scope: URL prefixes (or bare host names) the crawler may fetch. Empty means the hosts"
            " of the seeds."
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
    extract_timeout_s: float = Field(
        10.0, gt=0, description="HTML-to-text extraction of one page is stopped after this long."
    )
    extract_memory_mb: int = Field(
        1024,
        ge=128,
        description="Memory bound (MiB) of the HTML-to-text worker; about 70 MiB is its own.",
    )
    write_warc: bool = Field(
        True, description="Keep every HTTP response raw as WARC next to the shards, for replay."
    )
