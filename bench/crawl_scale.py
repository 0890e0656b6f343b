"""How llmflow's HTTP crawl scales on a large local site, and what a kill and resume fetches twice.

Usage (from the repository root, project venv active; as root: ``apt-get install -y rust-doc
nginx``)::

    python bench/crawl_scale.py --pages 2000 10000 0 --kill-at 1000 --kill-max-pages 2000 \\
        --out bench/crawl_scale.md [--work /tmp/llmflow-crawl] [--concurrency 8]

The site is Debian's ``rust-doc`` (/usr/share/doc/rust-doc/html: ~32,000 HTML pages, ~21,600
reachable from its index), served on 127.0.0.1 by nginx with an unbuffered access log of its own
(``$msec $status $request_uri``). nginx rather than a Python server: on a 2-core machine the
server shares the cores with the crawl it serves, and nginx serves a static page for a few tens
of microseconds of CPU where Python's ``http.server`` takes about a millisecond; its own CPU time
is measured and reported, so the table shows it was not the bottleneck. The log is the ground
truth of what was fetched: every request, with its time.

Each crawl is ``llmflow run --stages crawl`` in a fresh workdir (seed: the site's index;
``allow_private_addresses`` true, ``politeness_delay_s`` 0, ``max_depth`` 1000, ``max_pages`` N;
``--pages 0`` is the whole site), measured with its whole process tree (bench/process_tree.py).
*Crawl window*: from the first request in the log to the last; pages/s, CPU-ms per page and cores
(CPU-s / wall s) are over that window (the tree's CPU sampled every 0.25 s), so the command's
fixed cost (imports, Prefect's API server, writing the output after the last fetch) is left out;
the whole command's figures are beside them.

Kill and resume: a crawl of ``--kill-max-pages`` is SIGKILLed (its whole tree) once the log shows
``--kill-at`` page requests, then the same command runs again in the same workdir. Reported: the
page URLs (robots.txt left out) the first run requested, the second, and those requested in both
(fetched twice); the goal is none beyond the last checkpoint batch.

Every measurement accumulates in ``--results`` (JSON) and ``--out`` is rendered from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from process_tree import (  # noqa: E402
    MeasuredProcess,
    TreeRun,
    die_with_parent,
    load_average,
    machine_facts,
)
from scale import git_commit, llmflow_command, md_head, md_preamble, md_row, merge  # noqa: E402

SITE = Path("/usr/share/doc/rust-doc/html")
WHOLE_SITE = 1_000_000  # max_pages for --pages 0: more than the site has
MB = 2**20
FULL = ["python bench/crawl_scale.py --pages 2000 10000 0 --kill-at 5000 --kill-max-pages 10000"]
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format bench '$msec $status $request_uri';
    access_log {tmp}/access.log bench;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {site};
        index index.html;
    }}
}}
"""


class Site:
    """rust-doc served by our own nginx, and its access log read as (time, status, path)."""

    def __init__(self, tmp: Path, site: Path) -> None:
        from llmflow.tasks.ingest.pydoc_site import free_port

        if not (site / "index.html").exists():
            sys.exit(f"{site}/index.html not found: apt-get install -y rust-doc")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            sys.exit("nginx not found: apt-get install -y nginx")
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = tmp / "access.log"
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=self.port, site=site))
        self.process = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp)],
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.url = f"http://127.0.0.1:{self.port}/index.html"
        deadline = time.monotonic() + 10
        while not self.log.exists() or not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit(f"nginx did not start: see {tmp}/error.log")
            time.sleep(0.1)

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def offset(self) -> int:
        return self.log.stat().st_size

    def requests(self, start: int, end: int | None = None) -> list[tuple[float, int, str]]:
        with open(self.log, "rb") as f:
            f.seek(start)
            raw = f.read() if end is None else f.read(end - start)
        out = []
        for line in raw.decode("utf-8", "replace").splitlines():
            msec, status, path = line.split(" ", 2)
            out.append((float(msec), int(status), path))
        return out

    def cpu_s(self) -> float:
        """CPU seconds of nginx so far (master and worker: the session it was started in)."""
        from process_tree import session_cpu_s

        return session_cpu_s(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def pages_of(requests: list[tuple[float, int, str]]) -> list[tuple[float, int, str]]:
    return [r for r in requests if r[2] != "/robots.txt"]


def crawl_config(workdir: Path, site: Site, max_pages: int, args: argparse.Namespace) -> Path:
    config = {
        "workdir": str(workdir),
        "runner": args.runner,
        "max_workers": args.max_workers,
        "crawl": {
            "seeds": [site.url],
            "allow_private_addresses": True,
            "politeness_delay_s": 0,
            "max_pages": max_pages,
            "max_depth": 1000,
            "concurrency": args.concurrency,
        },
    }
    path = workdir / "bench-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def crawl_manifest(workdir: Path) -> dict[str, Any]:
    from scale import stage_manifest

    return stage_manifest(workdir, "crawl")


def start_crawl(config: Path, workdir: Path, name: str) -> tuple[MeasuredProcess, float]:
    command = [*llmflow_command(), "run", "-c", str(config), "--stages", "crawl"]
    log = workdir / "logs" / f"bench-{name}.log"
    return MeasuredProcess(command, log=log, cwd=workdir), time.time()


def window(
    tree: TreeRun, started: float, requests: list[tuple[float, int, str]]
) -> dict[str, float]:
    """Pages/s, CPU-ms per page and cores between the first and the last request."""
    if len(requests) < 2:
        return {"window_s": 0.0, "window_cpu_s": 0.0}
    t0, t1 = requests[0][0] - started, requests[-1][0] - started
    cpu = tree.cpu_at(t1) - tree.cpu_at(t0)
    return {"window_s": round(t1 - t0, 2), "window_cpu_s": round(cpu, 2)}


def context(args: argparse.Namespace, load_before: str) -> dict[str, Any]:
    """What every row records about how and when it was measured."""
    return {
        "load_before": load_before,
        "load_after": load_average(),
        "concurrency": args.concurrency,
        "runner": args.runner,
        "commit": args.commit,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def finished(row: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def measure_crawl(site: Site, max_pages: int, args: argparse.Namespace) -> dict[str, Any]:
    label = "whole site" if max_pages == WHOLE_SITE else f"{max_pages:,}"
    workdir = args.work / f"crawl-{max_pages}"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)
    config = crawl_config(workdir, site, max_pages, args)
    load_before, nginx_before, offset = load_average(), site.cpu_s(), site.offset()
    measured, started = start_crawl(config, workdir, "crawl")
    tree = measured.wait()
    requests = site.requests(offset)
    pages = pages_of(requests)
    counts = crawl_manifest(workdir).get("counts", {})
    row = {
        "kind": "crawl",
        "max_pages": label,
        "returncode": tree.returncode,
        "requests": len(requests),
        "pages_requested": len(pages),
        "pages_ok": sum(1 for r in pages if r[1] == 200),
        "docs_kept": counts.get("kept", 0),
        "fetch_failures": counts.get("fetch_failures", 0),
        "wall_s": round(tree.wall_s, 2),
        "cpu_s": round(tree.cpu_s, 2),
        **window(tree, started, requests),
        "peak_tree_mb": round(tree.peak_tree_rss / MB, 1),
        "peak_process_mb": round(tree.peak_process_rss / MB, 1),
        "max_processes": tree.max_processes,
        "nginx_cpu_s": round(site.cpu_s() - nginx_before, 2),
        **context(args, load_before),
    }
    return finished(row, workdir, args)


def kill_and_resume(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.work / "crawl-kill"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)
    config = crawl_config(workdir, site, args.kill_max_pages, args)
    load_before = load_average()
    offset = site.offset()
    measured, _ = start_crawl(config, workdir, "first")
    while measured.process.poll() is None:
        if len(pages_of(site.requests(offset))) >= args.kill_at:
            measured.kill_tree()
            break
        time.sleep(0.05)
    first_tree = measured.wait()
    first = pages_of(site.requests(offset))
    state_files = sorted(
        str(p.relative_to(workdir)) for p in (workdir / "data").rglob("*") if p.is_file()
    )
    middle = site.offset()
    measured, _ = start_crawl(config, workdir, "resume")
    second_tree = measured.wait()
    second = pages_of(site.requests(middle))
    first_urls, second_urls = Counter(r[2] for r in first), Counter(r[2] for r in second)
    twice = sorted(set(first_urls) & set(second_urls))
    row = {
        "kind": "kill-resume",
        "max_pages": f"{args.kill_max_pages:,}",
        "kill_at": args.kill_at,
        "first_returncode": first_tree.returncode,
        "returncode": second_tree.returncode,
        "first_pages": len(first),
        "first_distinct": len(first_urls),
        "second_pages": len(second),
        "second_distinct": len(second_urls),
        "fetched_twice": len(twice),
        "fetched_twice_share": round(len(twice) / max(1, len(first_urls)), 4),
        "refetched_examples": twice[:5],
        "files_after_kill": len(state_files),
        "files_after_kill_examples": state_files[:12],
        "docs_kept": crawl_manifest(workdir).get("counts", {}).get("kept", 0),
        "first_wall_s": round(first_tree.wall_s, 2),
        "second_wall_s": round(second_tree.wall_s, 2),
        **context(args, load_before),
    }
    return finished(row, workdir, args)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["kind"], row["max_pages"])


def render(results: dict[str, Any], note: str | None) -> str:
    title = "Crawl at scale: rust-doc on loopback, and a kill and resume"
    out = md_preamble(title, "crawl_scale", FULL, results, note)
    out += [
        "",
        "Goal: ≥ 100 pages/s with more than 1.6 cores busy on 2 (CPU utilisation of the crawl's"
        " process tree over the crawl window).",
        "",
        *md_head(
            ["max_pages", "load before → after", "commit", "pages requested (200)", "docs kept"]
            + ["window s", "pages/s", "CPU-ms / page", "cores", "command wall s", "command CPU s"]
            + ["peak tree MB", "largest process MB", "processes", "nginx CPU-ms / request"],
            3,
        ),
    ]
    crawls = [r for r in results["rows"] if r["kind"] == "crawl"]
    for r in crawls:
        w, pages = r["window_s"], max(1, r["pages_requested"])
        rate = f"{r['pages_requested'] / w:.1f}" if w else "n/a"
        cores = f"{r['window_cpu_s'] / w:.2f}" if w else "n/a"
        load = f"{r['load_before'].split()[0]} → {r['load_after'].split()[0]}"
        commit = r["commit"] + (f" (rc {r['returncode']})" if r["returncode"] else "")
        cells = [r["max_pages"], load, commit, f"{r['pages_requested']:,} ({r['pages_ok']:,})"]
        cells += [
            f"{r['docs_kept']:,}",
            f"{w:,.1f}",
            rate,
            f"{r['window_cpu_s'] / pages * 1e3:.1f}",
        ]
        cells += [cores, f"{r['wall_s']:,.1f}", f"{r['cpu_s']:,.1f}", f"{r['peak_tree_mb']:,.0f}"]
        cells += [f"{r['peak_process_mb']:,.0f}", str(r["max_processes"])]
        out.append(md_row([*cells, f"{r['nginx_cpu_s'] / max(1, r['requests']) * 1e3:.2f}"]))
    for r in (r for r in results["rows"] if r["kind"] == "kill-resume"):
        out += [
            "",
            f"## Kill and resume (max_pages {r['max_pages']}, SIGKILL after {r['kill_at']:,}"
            f" page requests; {r['when']}, commit {r['commit']})",
            "",
            "| | pages requested | distinct URLs | wall s | exit |",
            "|---|---:|---:|---:|---|",
            f"| first run (killed) | {r['first_pages']:,} | {r['first_distinct']:,}"
            f" | {r['first_wall_s']:,.1f} | {r['first_returncode']} |",
            f"| resumed run | {r['second_pages']:,} | {r['second_distinct']:,}"
            f" | {r['second_wall_s']:,.1f} | {r['returncode']} |",
            "",
            f"**Fetched twice: {r['fetched_twice']:,} URLs ({r['fetched_twice_share']:.1%} of"
            f" the first run's)**; documents kept after the resume: {r['docs_kept']:,}."
            f" Files under the data root after the kill: {r['files_after_kill']}"
            + (
                f" (e.g. {', '.join(r['files_after_kill_examples'][:6])})"
                if r["files_after_kill"]
                else ""
            )
            + ".",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pages", type=int, nargs="*", default=[2000], help="max_pages; 0: the whole site"
    )
    parser.add_argument(
        "--kill-at", type=int, default=1000, help="page requests before SIGKILL; 0: no kill test"
    )
    parser.add_argument("--kill-max-pages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runner", choices=["threads", "processes", "dask"], default="threads")
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--site", type=Path, default=SITE)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmflow-crawl"))
    parser.add_argument(
        "--results", type=Path, default=None, help="default: WORK/crawl-results.json"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "crawl_scale.md")
    parser.add_argument("--note", default=None, help="a line printed in bold at the top of --out")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the crawl and nginx are stopped
    args.commit = git_commit()
    results_path = args.results or args.work / "crawl-results.json"
    meta = {
        "id": f"{time.time():.0f}-{os.getpid()}",
        "command": "python bench/crawl_scale.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": args.commit,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load_average(),
        "load_after": "",
        "machine": machine_facts(),
    }
    site = Site(args.work / "nginx", args.site)
    try:
        for pages in args.pages:
            row = measure_crawl(site, pages or WHOLE_SITE, args)
            meta["load_after"] = load_average()
            results = merge(results_path, [row], meta, _key)
            args.out.write_text(render(results, args.note))
        if args.kill_at:
            row = kill_and_resume(site, args)
            meta["load_after"] = load_average()
            results = merge(results_path, [row], meta, _key)
            args.out.write_text(render(results, args.note))
    finally:
        site.stop()
    print(f"wrote {args.out} (all results: {results_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
