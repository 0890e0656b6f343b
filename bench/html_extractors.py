"""Benchmark: trafilatura against resiliparse for HTML-to-text, on quality and speed.

Decides ``DEFAULT_EXTRACTOR`` in ``tasks/ingest/html_text.py``. Three sources:

* the Python 3.11 HTML documentation (Debian package ``python3.11-doc``): Sphinx pages with real
  boilerplate (navigation bars, sidebars, footers) whose main content is known, because each
  page's reST source ships under ``_sources/``;
* pages of Python's own pydoc HTTP server (started here on a free localhost port), which are
  nothing but content apart from a two-line header, so their visible text is the ground truth;
* the real web pages in the WARC files under ``shared/data/web`` (no ground truth: speed, output
  length and the share of pages that come out empty).

Quality is bag-of-words precision, recall and F1 of the lowercased alphanumeric tokens of the
output against the ground truth, averaged over pages. The reST sources are markup, cleaned here
into plain text; tokens that Sphinx generates (the module name in front of a function, footnote
numbers, "Changed in version" phrasing) or that the cleaning misses cost every extractor
alike, so the figures are for comparison, not absolute.

Run (from the repository root)::

    /tmp/venv/bin/python bench/html_extractors.py

It prints the tables and rewrites the results block of ``bench/html_extractors.md`` (the prose
around it is kept). ``--help`` lists the options (sample sizes, seed, data directories).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import PYDOC_UNSAFE_PAGES
from llmflow.tasks.ingest.html_text import (
    RESILIPARSE_OPTIONS,
    TRAFILATURA_OPTIONS,
    ExtractionError,
    _extract,
)
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body
from llmflow.tasks.ingest.pydoc_site import pydoc_site

REPO = Path(__file__).resolve().parent.parent
DOCS_DIR = Path("/usr/share/doc/python3.11/html")
WEB_DIR = REPO.parent / "shared" / "data" / "web"
MD_PATH = Path(__file__).with_suffix(".md")
RESULTS_START = "<!-- results:start (written by bench/html_extractors.py) -->"
RESULTS_END = "<!-- results:end -->"

# The two production configurations (exactly what html_to_text runs) and variants that show what
# an option is worth. Each takes (html, url) and returns text.
CONFIGS: dict[str, Callable[[str, str | None], str]] = {
    "resiliparse": lambda html, url: _extract(html, "resiliparse", url),
    "trafilatura": lambda html, url: _extract(html, "trafilatura", url),
    # trafilatura's own default (neither favor_recall nor favor_precision).
    "trafilatura balanced": lambda html, url: _extract(
        html, "trafilatura", url, {**TRAFILATURA_OPTIONS, "favor_recall": False}
    ),
    "trafilatura favor_precision": lambda html, url: _extract(
        html,
        "trafilatura",
        url,
        {**TRAFILATURA_OPTIONS, "favor_recall": False, "favor_precision": True},
    ),
    # Reference point: every visible text, no boilerplate removal at all.
    "resiliparse all text": lambda html, url: _extract(
        html, "resiliparse", url, {**RESILIPARSE_OPTIONS, "main_content": False}
    ),
}
PRODUCTION = ("resiliparse", "trafilatura")

# Pure-Python standard-library modules for the pydoc source (checked again at run time: a module
# that is not a .py file here is skipped). None of them does anything when imported.
PYDOC_MODULES = """
abc argparse ast base64 bdb bisect calendar cmd code codecs codeop colorsys configparser
contextlib copy copyreg csv dataclasses difflib dis enum filecmp fileinput fnmatch fractions
ftplib functools getopt gettext glob graphlib gzip heapq hmac imaplib inspect ipaddress keyword
linecache locale mimetypes netrc numbers operator optparse pathlib pickletools pprint queue
quopri random reprlib sched secrets selectors shlex shutil smtplib statistics string stringprep
tabnanny tempfile textwrap timeit tokenize trace traceback types typing uuid warnings wave
weakref zipfile
""".split()  # noqa: SIM905 (a list literal of 80 strings reads worse)

TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> collections.Counter[str]:
    return collections.Counter(TOKEN.findall(text.lower()))


def precision_recall_f1(predicted: str, truth: str) -> tuple[float, float, float]:
    """Bag-of-words overlap; an empty output scores 0 on all three (it found nothing)."""
    pred, gold = tokens(predicted), tokens(truth)
    overlap = sum((pred & gold).values())
    if not overlap:
        return 0.0, 0.0, 0.0
    precision = overlap / sum(pred.values())
    recall = overlap / sum(gold.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


@dataclass
class Page:
    name: str
    html: str
    url: str | None = None
    truth: str | None = None
    # A Sphinx page that is mostly a table of contents of other pages (a toctree directive):
    # the ground truth has no text for the contents list, while the page shows it.
    index_page: bool = False

    @property
    def size(self) -> int:
        return len(self.html.encode("utf-8", "replace"))


@dataclass
class Result:
    source: str
    config: str
    pages: int = 0
    html_bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    scores: list[tuple[float, float, float]] = field(default_factory=list)
    index_page: list[bool] = field(default_factory=list)
    out_chars: list[int] = field(default_factory=list)
    empty: int = 0
    errors: int = 0

    def mean(self, index: int) -> float | None:
        return statistics.fmean(s[index] for s in self.scores) if self.scores else None

    @property
    def total_s(self) -> float:
        return sum(self.seconds)


# --- sources -------------------------------------------------------------------------------------

_HIDDEN_DIRECTIVES = {"index", "testsetup", "testcleanup", "toctree", "tabularcolumns", "raw"}
_NO_ARGUMENT_DIRECTIVES = {
    "code-block",
    "sourcecode",
    "code",
    "highlight",
    "literalinclude",
    "include",
    "image",
    "figure",
    "testcode",
    "testoutput",
    "doctest",
    "only",
    "module",
    "currentmodule",
    "moduleauthor",
    "sectionauthor",
    "highlightlang",
}
_DIRECTIVE_LABELS = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
    "note": "Note",
    "warning": "Warning",
    "seealso": "See also",
    "impl-detail": "CPython implementation detail:",
    "availability": "Availability:",
    "audit-event": "Raises an auditing event",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)(.*)$")
_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")
_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`(.+?)`", re.DOTALL)
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_FOOTNOTE_REF = re.compile(r"\[#?[\w-]*\]_")
_SUBSTITUTION = re.compile(r"\|[\w-]+\|")


def _role(match: re.Match[str]) -> str:
    role, content = match.group(1), match.group(2)
    titled = re.match(r"(.*?)\s*<[^<>]*>$", content, re.DOTALL)
    if titled and titled.group(1):
        return titled.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    return {"rfc": "RFC ", "pep": "PEP "}.get(role, "") + content


def rst_to_text(source: str) -> str:
    """Readable text of a Sphinx reST page, close to what Sphinx renders as the page body."""
    out: list[str] = []
    skip_indent: int | None = None  # skipping the body of a hidden directive or a comment
    after_directive = False
    for line in source.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if after_directive and _OPTION.match(line):
            continue
        after_directive = False
        directive = _DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2), directive.group(3)
            if name in _HIDDEN_DIRECTIVES or name == "replace" or "|" in line.split("::")[0]:
                skip_indent = indent
                continue
            after_directive = True
            if name in _NO_ARGUMENT_DIRECTIVES:
                argument = ""
            line = f"{_DIRECTIVE_LABELS.get(name, '')} {argument}"
        else:
            explicit = _EXPLICIT.match(line)
            if explicit:
                rest = explicit.group(3)
                if rest.startswith("["):  # footnote: its text is rendered
                    line = rest.split("]", 1)[-1]
                else:  # target (.. _label:) or comment
                    skip_indent = indent
                    continue
        line = _ROLE.sub(_role, line)
        line = _LINK.sub(r"\1", line)
        line = _REF.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        line = _FOOTNOTE_REF.sub("", line)
        line = _SUBSTITUTION.sub("", line)
        out.append(line)
    return "\n".join(out)


def docs_pages(docs_dir: Path, sample: int, seed: int) -> Iterator[Page]:
    pages = sorted((docs_dir / "library").glob("*.html"))
    pages = [p for p in pages if (docs_dir / "_sources" / "library" / f"{p.stem}.rst.txt").exists()]
    chosen = sorted(random.Random(seed).sample(pages, min(sample, len(pages))))
    for path in chosen:
        source = (docs_dir / "_sources" / "library" / f"{path.stem}.rst.txt").read_text("utf-8")
        yield Page(
            name=f"library/{path.name}",
            html=path.read_text(encoding="utf-8"),
            url=f"https://docs.python.org/3.11/library/{path.name}",
            truth=rst_to_text(source),
            index_page=".. toctree::" in source,
        )


def visible_text(html: str) -> str:
    """pydoc ground truth: the page's visible text minus its two-line header (version, nav)."""
    import lxml.html

    root = lxml.html.fromstring(html)
    for element in root.xpath(
        "//head | //script | //style | //body/div[@style='float:left' or @style='float:right']"
    ):
        element.drop_tree()
    return root.text_content()


def pydoc_pages(count: int) -> Iterator[Page]:
    unsafe = [re.compile(p) for p in PYDOC_UNSAFE_PAGES]
    modules = []
    for name in PYDOC_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        if any(p.search(f"/{name}.html") for p in unsafe):
            continue
        modules.append(name)
    with pydoc_site() as base:  # the crawler's own embedded site: stdlib only, stopped by pid
        for name in modules[:count]:
            url = f"{base}{name}.html"
            with urllib.request.urlopen(url, timeout=60) as response:
                html = response.read().decode("utf-8")
            yield Page(name=f"{name}.html", html=html, url=url, truth=visible_text(html))


def web_pages(web_dir: Path) -> Iterator[Page]:
    from warcio.archiveiterator import ArchiveIterator

    paths = sorted(
        p
        for p in glob.glob(str(web_dir / "**" / "*.warc*"), recursive=True)
        if p.endswith((".warc", ".warc.gz"))
    )
    undecodable = 0
    for path in paths:
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                if record.http_headers.get_statuscode() != "200":
                    continue
                content_type = record.http_headers.get_header("Content-Type") or ""
                if "html" not in content_type.lower():
                    continue
                body = record.content_stream().read()
                try:
                    html, _charset = decode_body(body, content_type)
                except DecodeError:
                    undecodable += 1
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                yield Page(name=f"{Path(path).name}:{url}", html=html, url=url)
    if undecodable:
        print(f"  web: {undecodable} response(s) skipped by decode_body", file=sys.stderr)


# --- running -----------------------------------------------------------------------------------


def run_source(source: str, pages: list[Page], configs: list[str], repeat: int) -> list[Result]:
    """Each page ``repeat`` times per config; its fastest run counts (the machine is shared)."""
    results = []
    for config in configs:
        function = CONFIGS[config]
        function(pages[0].html, pages[0].url)  # warm-up: imports, lazy initialisation
        result = Result(source, config)
        for page in pages:
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                try:
                    text = function(page.html, page.url)
                except Exception as error:  # counted, shown, and the page scores 0
                    print(f"  {config} failed on {page.name}: {error}", file=sys.stderr)
                    text = ""
                    result.errors += 1
                    break
                finally:
                    best = min(best, time.perf_counter() - start)
            result.seconds.append(best)
            result.pages += 1
            result.html_bytes += page.size
            result.out_chars.append(len(text))
            if not TOKEN.search(text):
                result.empty += 1
            if page.truth is not None:
                result.scores.append(precision_recall_f1(text, page.truth))
                result.index_page.append(page.index_page)
        results.append(result)
        print(f"  {config}: {result.pages} pages in {result.total_s:.1f} s", file=sys.stderr)
    return results


def without_index_pages(results: list[Result]) -> list[list[str]]:
    """Quality on the Sphinx pages that are not mostly a table of contents."""
    rows = []
    for r in results:
        kept = [s for s, index in zip(r.scores, r.index_page, strict=True) if not index]
        if len(kept) == len(r.scores) or not kept:
            continue
        means = [statistics.fmean(s[i] for s in kept) for i in range(3)]
        rows.append([r.source, r.config, str(len(kept)), *(fmt(m) for m in means)])
    return rows


def bounded_overhead(pages: list[Page]) -> list[tuple[str, float, float]]:
    """Pages/s in process and through BoundedExtractor (pickling over a pipe), per backend."""
    rows = []
    for extractor in PRODUCTION:
        start = time.perf_counter()
        for page in pages:
            _extract(page.html, extractor, page.url)
        in_process = len(pages) / (time.perf_counter() - start)
        with BoundedExtractor(extractor, cpu_s=120, memory_mb=4096, workers=1) as bounded:
            bounded.extract(pages[0].html)  # wait for the worker
            start = time.perf_counter()
            for page in pages:
                bounded.extract(page.html, page.url)
            through_worker = len(pages) / (time.perf_counter() - start)
        rows.append((extractor, in_process, through_worker))
    return rows


PATHOLOGICAL: dict[str, Callable[[], str]] = {
    "20,000 nested <div>": lambda: (
        "<html><body>" + "<div>" * 20_000 + "x" + "</div>" * 20_000 + "</body></html>"
    ),
    "one tag, 40,000 attributes": lambda: (
        "<html><body><div " + " ".join(f"a{i}=x" for i in range(40_000)) + ">hi</div></body></html>"
    ),
    "2 MB of short <p>": lambda: (
        "<html><body><article>"
        + "<p>Some words in a paragraph here.</p>" * 52_000
        + "</article></body></html>"
    ),
}


def pathological(limit_s: float) -> list[list[str]]:
    """Seconds per backend on inputs that are quadratic in one library or the other."""
    rows = []
    for name, make in PATHOLOGICAL.items():
        html = make()
        row = [name, f"{len(html) / 1e6:.2f}"]
        for extractor in PRODUCTION:
            with BoundedExtractor(
                extractor, cpu_s=limit_s, wall_s=10 * limit_s, memory_mb=4096, workers=1
            ) as bounded:
                bounded.extract("<p>warm-up</p>")
                start = time.perf_counter()
                try:
                    bounded.extract(html)
                    row.append(f"{time.perf_counter() - start:.1f}")
                except ExtractionError as error:
                    row.append(
                        f"> {limit_s:.0f}"
                        if error.reason == "extract_cpu_timeout"
                        else error.reason
                    )
        rows.append(row)
    return rows


# --- reporting ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        seconds = sorted(r.seconds)
        rows.append(
            [
                r.source,
                r.config,
                str(r.pages),
                fmt(r.mean(0)),
                fmt(r.mean(1)),
                fmt(r.mean(2)),
                f"{r.pages / r.total_s:.1f}",
                f"{r.html_bytes / r.total_s / 1e6:.2f}",
                f"{statistics.median(seconds) * 1000:.0f}",
                f"{seconds[-1] * 1000:.0f}",
                f"{statistics.fmean(r.out_chars):.0f}",
                f"{r.empty / r.pages:.0%}",
            ]
        )
    return rows


HEADER = [
    "source",
    "extractor",
    "pages",
    "precision",
    "recall",
    "F1",
    "pages/s",
    "MB/s",
    "p50 ms",
    "max ms",
    "chars out",
    "empty",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    )


def environment() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    docs = "absent"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        docs = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "python3.11-doc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("resiliparse", "trafilatura", "lxml", "charset-normalizer")
    )
    return [
        f"- Machine: {os.cpu_count()} cores ({cpu}), single process, one page at a time;"
        f" Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"- Libraries: {versions}; python3.11-doc {docs}",
    ]


def decide(results: list[Result]) -> str:
    """Quality first (mean F1 over the sources with ground truth), then speed."""
    by_config: dict[str, list[Result]] = collections.defaultdict(list)
    for r in results:
        if r.config in PRODUCTION:
            by_config[r.config].append(r)
    f1 = {c: statistics.fmean(r.mean(2) for r in rs if r.scores) for c, rs in by_config.items()}
    speed = {
        c: sum(r.pages for r in rs) / sum(r.total_s for r in rs) for c, rs in by_config.items()
    }
    best = max(f1, key=f1.get)
    other = next(c for c in f1 if c != best)
    close = abs(f1[best] - f1[other]) < 0.01
    winner = max(speed, key=speed.get) if close else best
    tie = "; F1 within 0.01, so speed decides" if close else ""
    return (
        "Mean F1 over the sources with ground truth: "
        + ", ".join(f"{c} {f1[c]:.3f}" for c in PRODUCTION)
        + "; pages/s over all sources: "
        + ", ".join(f"{c} {speed[c]:.1f}" for c in PRODUCTION)
        + f". Rule (quality first, speed second{tie}) -> **{winner}**."
    )


def write_markdown(path: Path, block: str) -> None:
    block = f"{RESULTS_START}\n{block}\n{RESULTS_END}"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if RESULTS_START in text and RESULTS_END in text:
            head, rest = text.split(RESULTS_START, 1)
            tail = rest.split(RESULTS_END, 1)[1]
            path.write_text(head + block + tail, encoding="utf-8")
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n", encoding="utf-8")
        return
    path.write_text(f"# HTML-to-text extractors\n\n{block}\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR)
    parser.add_argument("--docs-sample", type=int, default=100)
    parser.add_argument("--pydoc-pages", type=int, default=50)
    parser.add_argument("--web-dir", type=Path, default=WEB_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--markdown", type=Path, default=MD_PATH, help="results file to update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs per page (min kept)")
    parser.add_argument(
        "--pathological-limit",
        type=float,
        default=60.0,
        help="seconds allowed per pathological page (0 skips that part)",
    )
    args = parser.parse_args()

    sources: dict[str, list[Page]] = {}
    if (args.docs_dir / "library").is_dir():
        sources["python docs"] = list(docs_pages(args.docs_dir, args.docs_sample, args.seed))
    else:
        print(f"skipping python docs: {args.docs_dir} absent (apt-get install python3.11-doc)")
    if args.pydoc_pages > 0:
        sources["pydoc"] = list(pydoc_pages(args.pydoc_pages))
    if args.web_dir.is_dir():
        web = list(web_pages(args.web_dir))
        if web:
            sources["web (WARC)"] = web
        else:
            print(f"skipping web pages: no HTML responses in WARC files under {args.web_dir}")
    else:
        print(f"skipping web pages: {args.web_dir} absent")
    if not sources:
        sys.exit("no source available")

    results: list[Result] = []
    for name, pages in sources.items():
        megabytes = sum(p.size for p in pages) / 1e6
        print(f"{name}: {len(pages)} pages, {megabytes:.1f} MB of HTML", file=sys.stderr)
        results += run_source(name, pages, args.configs, args.repeat)

    rows = table(results)
    print()
    print(text_table(HEADER, rows))
    content_rows = without_index_pages(results)
    content_header = ["source", "extractor", "pages", "precision", "recall", "F1"]
    if content_rows:
        print("\nWithout the table-of-contents pages:")
        print(text_table(content_header, content_rows))
    overhead = bounded_overhead(next(iter(sources.values())))
    overhead_rows = [[e, f"{a:.1f}", f"{b:.1f}"] for e, a, b in overhead]
    overhead_header = ["extractor", "in process pages/s", "BoundedExtractor pages/s"]
    print()
    print(text_table(overhead_header, overhead_rows))
    slow_header = ["pathological page", "MB", *(f"{e} s" for e in PRODUCTION)]
    slow_rows = pathological(args.pathological_limit) if args.pathological_limit > 0 else []
    if slow_rows:
        print()
        print(text_table(slow_header, slow_rows))
    verdict = decide(results) if set(PRODUCTION) <= set(args.configs) else ""
    print()
    print(verdict)

    sizes = ", ".join(
        f"{name} {len(pages)} pages / {sum(p.size for p in pages) / 1e6:.1f} MB"
        for name, pages in sources.items()
    )
    block = "\n".join(
        [
            *environment(),
            f"- Inputs: {sizes} (docs sample seed {args.seed})",
            "- Command: `/tmp/venv/bin/python bench/html_extractors.py`"
            f" (timings: fastest of {args.repeat} runs per page)",
            "",
            markdown_table(HEADER, rows),
            "",
            *(
                [
                    "Without the Sphinx pages that are mostly a table of contents (toctree):",
                    "",
                    markdown_table(content_header, content_rows),
                    "",
                ]
                if content_rows
                else []
            ),
            f"BoundedExtractor overhead ({next(iter(sources))} pages):",
            "",
            markdown_table(overhead_header, overhead_rows),
            "",
            *(
                [
                    "Pathological pages (through BoundedExtractor, one at a time):",
                    "",
                    markdown_table(slow_header, slow_rows),
                    "",
                ]
                if slow_rows
                else []
            ),
            verdict,
        ]
    )
    if not args.no_write:
        write_markdown(args.markdown, block)
        print(f"\nresults written to {args.markdown}")


if __name__ == "__main__":
    main()
