"""The ``installed:`` seed: package descriptions and licence files, offline, in stable order."""

from __future__ import annotations

import os

import pytest

from llmflow.tasks.core.documents import Document
from llmflow.tasks.ingest.crawl import plan_crawl_units
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.installed_docs import installed_digest, installed_documents


def test_reads_descriptions_and_licences_of_installed_packages() -> None:
    docs = [d for d in installed_documents(max_bytes=5_000_000) if isinstance(d, Document)]
    urls = [d.url for d in docs]
    assert urls == [d.url for d in installed_documents(max_bytes=5_000_000)], "stable order"
    pyarrow_docs = {d.url.split("/", 4)[-1]: d for d in docs if "//pyarrow/" in (d.url or "")}
    assert "DESCRIPTION" in pyarrow_docs
    licence = next(d for name, d in pyarrow_docs.items() if "LICENSE" in name)
    assert "Apache License" in licence.text
    assert all(d.source == "installed" for d in docs)
    assert installed_digest() == installed_digest()


def test_oversize_files_are_rejected_not_read() -> None:
    small = [d for d in installed_documents(max_bytes=100) if isinstance(d, Document)]
    oversize = [d for d in small if d.reject_reason == "oversize"]
    assert oversize and all(d.text == "" for d in oversize)


def test_installed_seed_is_one_unit_keyed_by_the_installed_versions() -> None:
    units = plan_crawl_units(CrawlConfig(seeds=["installed:"]))
    assert [u.name for u in units] == ["installed"]
    assert units[0].key == plan_crawl_units(CrawlConfig(seeds=["installed:"]))[0].key


def test_the_pydoc_site_never_shows_the_runs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydoc renders default values, and cgi's default is ``environ=os.environ``: the server gets
    a fixed environment, so no variable of the run (an API auth string, a credential, a path)
    reaches the crawled pages, and the pages are the same on every machine."""
    import urllib.request

    from llmflow.tasks.ingest.pydoc_site import pydoc_site

    secret = "llmflow:not-for-the-dataset-7f3a"
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", secret)
    with pydoc_site() as url, urllib.request.urlopen(url + "cgi.html", timeout=30) as response:
        page = response.read().decode("utf-8")
    assert "FieldStorage" in page and "environ=environ(" in page  # the page that showed it
    assert secret not in page and "PREFECT_API_AUTH_STRING" not in page
    assert os.getcwd() not in page
