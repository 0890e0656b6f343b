"""The bounded extraction pool: real worker processes, real pathological pages, no mocks.

The slow and memory-hungry pages are real pathological inputs, measured on resiliparse 2.0 and
trafilatura 2.3 (see bench/html_extractors.md): one tag with tens of thousands of attributes
takes seconds in both libraries, and a few MB of markup needs far more than 200 MiB of parse
tree in either.

Where a test needs a worker to be slow on purpose it stops it with SIGSTOP rather than timing a
page: a stopped process uses no CPU and answers nothing, which is exactly "a loaded machine" or
"a busy worker", without a test that depends on how fast this machine is.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from test_html_text import ARTICLE

from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.html_text import EXTRACTORS, ExtractionError, html_to_text


def numbered(i: int) -> str:
    return ARTICLE.replace("Tide pools are", f"Tide pools ({i}) are")


def slow_page(attributes: int = 40_000) -> str:
    """One tag with many attributes: quadratic in both libraries (seconds at this size)."""
    attrs = " ".join(f"data-a{i}=x" for i in range(attributes))
    return f"<html><body><div {attrs}>hi</div>{ARTICLE}</body></html>"


def memory_hog(megabytes: int = 20) -> str:
    """Small elements by the million: a parse tree many times the size of the page."""
    return "<html><body>" + "<div><span>x</span></div>" * (megabytes * 40_000) + "</body></html>"


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def only_pid(bounded: BoundedExtractor) -> int:
    (pid,) = bounded.pids
    return pid


# --- one worker: the bounds ----------------------------------------------------------------------


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_bounded_matches_in_process(extractor: str) -> None:
    with BoundedExtractor(extractor, cpu_s=30) as bounded:
        assert bounded.extract(ARTICLE, "https://example.org/x") == html_to_text(
            ARTICLE, extractor, "https://example.org/x"
        )


@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_cpu_budget_kills_and_restarts(extractor: str) -> None:
    with BoundedExtractor(extractor, cpu_s=0.3, workers=1) as bounded:
        assert "Tide pools" in bounded.extract(ARTICLE)  # worker up: the budget is the page's
        first_pid = only_pid(bounded)
        with pytest.raises(ExtractionError) as caught:
            bounded.extract(slow_page())
        assert caught.value.reason == "extract_cpu_timeout"
        assert "CPU time" in caught.value.detail
        assert process_gone(first_pid)
        assert "Tide pools" in bounded.extract(ARTICLE)
        assert only_pid(bounded) != first_pid


def test_a_stopped_worker_is_not_over_its_cpu_budget() -> None:
    """Four times the CPU budget of wall clock with no CPU (a starved machine): the page is kept,
    where a wall-clock timeout of the same size would have rejected it."""
    cpu_s = 0.3
    with BoundedExtractor("resiliparse", cpu_s=cpu_s, wall_s=60, workers=1) as bounded:
        bounded.extract(ARTICLE)
        pid = only_pid(bounded)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        resume = threading.Timer(4 * cpu_s, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            text = bounded.extract(numbered(1))
        finally:
            resume.join()
        waited = time.monotonic() - started
        assert waited >= 4 * cpu_s, waited  # it did wait, stopped, that long
        assert "Tide pools (1) are" in text
        assert only_pid(bounded) == pid  # the same worker, kept


def test_wall_clock_backstop_has_its_own_reason() -> None:
    with BoundedExtractor("resiliparse", cpu_s=0.3, wall_s=0.6, workers=1) as bounded:
        bounded.extract(ARTICLE)
        pid = only_pid(bounded)
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(ExtractionError) as caught:
            bounded.extract(ARTICLE)
        assert caught.value.reason == "extract_wall_timeout"
        assert process_gone(pid)
        assert "Tide pools" in bounded.extract(ARTICLE)


def test_wall_backstop_cannot_be_shorter_than_the_budget() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        BoundedExtractor(cpu_s=10, wall_s=5)
    with pytest.raises(ValidationError, match="extract_wall_s"):
        CrawlConfig(extract_cpu_s=10, extract_wall_s=5)


def test_only_the_cpu_budget_is_in_the_crawl_key() -> None:
    """Workers and the backstop change how fast, not what: they redo no finished crawl."""
    base = CrawlConfig().output_hash()
    assert CrawlConfig(extract_workers=7, extract_wall_s=300).output_hash() == base
    assert CrawlConfig(extract_cpu_s=3).output_hash() != base


@pytest.mark.parametrize(
    ("extractor", "page_mb"),
    # trafilatura refuses pages over 20 MB outright (its MAX_FILE_SIZE), so it gets a smaller one.
    [("resiliparse", 20), ("trafilatura", 5)],
)
def test_memory_limit(extractor: str, page_mb: int) -> None:
    with BoundedExtractor(extractor, cpu_s=60, memory_mb=200, workers=1) as bounded:
        assert "Tide pools" in bounded.extract(ARTICLE)
        with pytest.raises(ExtractionError) as caught:
            bounded.extract(memory_hog(page_mb))
        assert caught.value.reason == "extract_memory"
        assert "Tide pools" in bounded.extract(ARTICLE)


def test_worker_killed_during_extraction() -> None:
    with BoundedExtractor("resiliparse", cpu_s=30, workers=1) as bounded:
        bounded.extract(ARTICLE)
        pid = only_pid(bounded)
        os.kill(pid, signal.SIGSTOP)  # holds the page until it is killed
        killer = threading.Timer(0.2, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(ExtractionError) as caught:
            bounded.extract(ARTICLE)
        killer.join()
        assert caught.value.reason == "extract_failed"
        assert "Tide pools" in bounded.extract(ARTICLE)


def test_worker_killed_between_pages() -> None:
    with BoundedExtractor("resiliparse", workers=1) as bounded:
        bounded.extract(ARTICLE)
        os.kill(only_pid(bounded), signal.SIGKILL)
        time.sleep(0.1)
        assert "Tide pools" in bounded.extract(ARTICLE)


# --- the pool ------------------------------------------------------------------------------------


def test_a_busy_worker_does_not_block_another_caller() -> None:
    """Two callers at once get two workers: while one worker holds its page (stopped), the other
    caller's page comes back from a second process."""
    with BoundedExtractor("resiliparse", workers=2) as bounded:
        bounded.extract(ARTICLE)
        stopped = only_pid(bounded)
        os.kill(stopped, signal.SIGSTOP)
        results: dict[int, str] = {}

        def work(i: int) -> None:
            results[i] = bounded.extract(numbered(i))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        try:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while not results and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(results) == 1, "neither caller got an answer from the second worker"
            assert sum(thread.is_alive() for thread in threads) == 1  # the other is held
            assert len(bounded.pids) == 2 and stopped in bounded.pids
        finally:
            os.kill(stopped, signal.SIGCONT)
            for thread in threads:
                thread.join()
        assert all(f"Tide pools ({i}) are" in results[i] for i in range(2))


def test_a_worker_outlives_the_thread_that_started_it() -> None:
    """Linux's parent-death signal follows the thread that forked the worker: a pool made and
    used in a short-lived thread (a Prefect task's, a reader's) must keep its worker after it."""
    made: list[BoundedExtractor] = []

    def make_and_use() -> None:
        bounded = BoundedExtractor("resiliparse", workers=1)
        bounded.extract(ARTICLE)  # the worker is up, its parent-death signal set
        made.append(bounded)

    thread = threading.Thread(target=make_and_use)
    thread.start()
    thread.join()
    with made[0] as bounded:
        pid = only_pid(bounded)
        time.sleep(0.2)  # time for a signal to land, were one sent
        assert "Tide pools (1) are" in bounded.extract(numbered(1))
        assert only_pid(bounded) == pid


def test_many_callers_share_a_pool_of_its_size() -> None:
    with BoundedExtractor("resiliparse", workers=2) as bounded:
        results: dict[int, str] = {}

        def work(i: int) -> None:
            results[i] = bounded.extract(numbered(i))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 1 <= len(bounded.pids) <= 2
    assert all(f"Tide pools ({i}) are" in results[i] for i in range(8))


def test_one_caller_at_a_time_holds_one_worker() -> None:
    with BoundedExtractor("resiliparse", workers=4) as bounded:
        for i in range(5):
            bounded.extract(numbered(i))
        assert len(bounded.pids) == 1


def test_imap_keeps_order_and_bounds_what_is_in_flight() -> None:
    """Item 0 finishes after item 2 on purpose; the output is still in input order, and no more
    than 2 x workers items are ever drawn ahead of what was yielded."""
    workers = 2
    item_2_done = threading.Event()
    drawn = 0

    def items() -> Iterator[int]:
        nonlocal drawn
        for i in range(12):
            drawn += 1
            yield i

    def fn(i: int) -> tuple[int, str]:
        if i == 0:
            assert item_2_done.wait(60)
        text = bounded.extract(numbered(i))
        if i == 2:
            item_2_done.set()
        return i, text

    with BoundedExtractor("resiliparse", workers=workers) as bounded:
        out = []
        for result in bounded.imap(fn, items()):
            assert drawn - len(out) <= 2 * workers
            out.append(result)
    assert [i for i, _ in out] == list(range(12))
    assert all(f"Tide pools ({i}) are" in text for i, text in out)


# --- closing -------------------------------------------------------------------------------------


def test_close_leaves_no_process() -> None:
    bounded = BoundedExtractor("resiliparse", workers=2)
    threads = [threading.Thread(target=bounded.extract, args=(numbered(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pids = bounded.pids
    assert pids and not any(process_gone(pid) for pid in pids)
    bounded.close()
    assert all(process_gone(pid) for pid in pids)
    bounded.close()  # idempotent
    with pytest.raises(RuntimeError):
        bounded.extract(ARTICLE)


def test_close_stops_a_worker_in_the_middle_of_a_page() -> None:
    bounded = BoundedExtractor("resiliparse", workers=1)
    bounded.extract(ARTICLE)
    pid = only_pid(bounded)
    os.kill(pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            bounded.extract(ARTICLE)
        except BaseException as error:
            errors.append(error)

    caller = threading.Thread(target=work)
    caller.start()
    time.sleep(0.2)  # the page is sent or about to be: either way close() must end the worker
    bounded.close()
    caller.join(30)
    assert not caller.is_alive()
    assert process_gone(pid)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert bounded.pids == []


def test_close_before_first_page() -> None:
    bounded = BoundedExtractor("trafilatura")
    pid = only_pid(bounded)
    bounded.close()
    assert process_gone(pid)
