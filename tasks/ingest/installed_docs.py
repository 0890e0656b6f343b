"""The ``installed:`` seed: the descriptions and licence files of the installed Python packages.

Part of the embedded default, next to ``pydoc:``. pydoc's pages are API reference (symbols,
signatures, repeated lines): real text, but text the quality rules mostly reject. The packages'
own descriptions are prose written for people, and their licence files are the web's most common
near-duplicates (one MIT licence differs from the next by a name and a year) with real e-mail
addresses in them: together the two seeds give every curation stage something to do, offline, on
any machine that has llmflow installed.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import re
from collections.abc import Iterator
from importlib.metadata import Distribution, distributions
from typing import cast

from llmflow.tasks.core.documents import Document, FetchFailure

INSTALLED_SEED = "installed:"
SOURCE = "installed"
_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)([._-].*)?$", re.IGNORECASE)


def _name(dist: Distribution) -> str:
    return re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "unknown").lower()


def _installed() -> list[Distribution]:
    """Each installed distribution once (the first on sys.path wins, as for imports), by name."""
    seen: dict[str, Distribution] = {}
    for dist in distributions():
        seen.setdefault(_name(dist), dist)
    return [seen[k] for k in sorted(seen)]


def installed_digest() -> str:
    """Names and versions of the installed distributions: the unit's input identity."""
    pairs = [(_name(d), d.version) for d in _installed()]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def installed_documents(max_bytes: int) -> Iterator[Document | FetchFailure]:
    """One document per package description and per licence-like file, in a stable order."""
    for dist in _installed():
        base = f"python-dist://{_name(dist)}/{dist.version}"
        # typeshed types metadata as the PackageMetadata protocol; it is an email Message
        metadata = cast(email.message.Message, dist.metadata)
        payload = metadata.get_payload()  # a metadata file's body: a str, or None
        description = (
            (payload if isinstance(payload, str) else None) or metadata.get("Description") or ""
        )
        if description.strip():
            yield Document(url=f"{base}/DESCRIPTION", text=description, source=SOURCE)
        for file in sorted(dist.files or [], key=str):
            if not _LICENSE_FILE.match(file.name):
                continue
            url = f"{base}/{file}"
            path = dist.locate_file(file)
            try:
                # typeshed: a SimplePath without read_bytes; a real Path for installed dists
                data = path.read_bytes()  # type: ignore[attr-defined]
            except OSError as error:
                yield FetchFailure(url=url, reason="unreadable", detail=str(error))
                continue
            if len(data) > max_bytes:
                yield Document(
                    url=url,
                    text="",
                    source=SOURCE,
                    reject_reason="oversize",
                    detail=f"{len(data)} bytes > max_page_bytes={max_bytes}",
                )
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                yield Document(
                    url=url, text="", source=SOURCE, reject_reason="undecodable", detail="not UTF-8"
                )
                continue
            yield Document(url=url, text=text, source=SOURCE)
