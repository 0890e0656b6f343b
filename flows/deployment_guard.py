"""What a deployment run may name: paths under the allowed roots, and no Dask scheduler of its own.

A deployment's parameters are the whole pipeline config, and anyone who may create a flow run of
it (in the Prefect UI, or through its API) chooses them. Unchecked, a run of the ``evaluate``
deployment could read any file the serving process can (``crawl.seeds: ["/etc/passwd"]`` stores
it as a document; ``evaluate.model`` loads whatever it names), write into any folder
(``workdir``, ``data_root``, ``dedup.index_dir``) or send the data stages' work to a Dask
scheduler of its choosing. So a run started from a deployment (``prefect.runtime.deployment.id``
is set) is refused, before any file is read or written, when one of its location parameters lies
outside the allowed roots or its ``dask_address`` is not one the operator allowed. ``llmflow run``
on the user's own machine is not checked: the user is the operator there.

The allow-lists come from the environment of the process that runs the flow, which a run's
parameters cannot change: ``llmflow serve`` sets them (its workdir, the locations its own config
names, ``--allow-root``, ``--allow-dask-address``), and a worker's operator sets them for
``prefect.yaml``'s deployments. Unset, the roots are ``./llmflow-work`` in the flow run's working
directory (the workdir the deployments default to) and no Dask address is allowed.

Which fields are locations is read from the pydantic models (:func:`location_fields`), not kept
in a list here, so a stage that gains a path field is checked without anyone remembering to.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from llmflow.flows.config import PipelineConfig

ROOTS_ENV = "LLMFLOW_ALLOWED_ROOTS"
DASK_ENV = "LLMFLOW_ALLOWED_DASK_ADDRESSES"
# "1": a deployment run may crawl with crawl.allow_private_addresses=true.
PRIVATE_ENV = "LLMFLOW_ALLOW_PRIVATE_ADDRESSES"
# Entries of both variables are separated by commas: roots may be URLs (s3://bucket/prefix), whose
# colons rule out os.pathsep.
SEPARATOR = ","
DEFAULT_ROOT = "llmflow-work"

# A field is a location when its description says it names a path, folder, file or fsspec URL, or
# its name says it is a folder (``workdir``, ``*_dir``, ``*_root``). tests/test_deployment_guard.py
# pins the set this finds, so a new path field shows up there.
_LOCATION_WORDS = re.compile(
    r"\b(paths?|folders?|director(y|ies)|files?|fsspec|URI)\b", re.IGNORECASE
)
_LOCATION_NAME = re.compile(r"(^workdir$|_dir$|_root$)")
# Seeds may also be the web (crawling it is the point; which addresses is the crawler's
# scope check) and the two embedded sources.
_SOURCE_FIELDS = {"crawl.seeds"}
_WEB_SCHEMES = {"http", "https"}
_EMBEDDED_SEEDS = re.compile(r"^(pydoc|installed):")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class DeploymentParameterError(ValueError):
    """A deployment run's parameters name something outside what the operator allowed; the
    message names each parameter, its value and the allow-list."""


def _is_str_field(annotation: Any) -> tuple[bool, bool]:  # noqa: ANN401 - any annotation
    """(holds strings, is a list of them) for ``str``, ``str | None`` and ``list[str]``."""
    if annotation is str:
        return True, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args == (str,):
        return True, True
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _is_str_field(kinds[0])
    return False, False


def location_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """The dotted names of the config's fields that hold paths or URLs of data, read from the
    models' field names and descriptions."""
    found: list[str] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += location_fields(annotation, f"{prefix}{name}.")
            continue
        is_str, _ = _is_str_field(annotation)
        if not is_str:
            continue
        if _LOCATION_NAME.search(name) or _LOCATION_WORDS.search(info.description or ""):
            found.append(f"{prefix}{name}")
    return found


def _values(config: BaseModel, dotted: str) -> Iterator[tuple[str, str]]:
    """(parameter name as a user sees it, value) of one location field; lists item by item."""
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield f"config.{dotted}[{i}]", item
    elif value:
        yield f"config.{dotted}", value


def _local_path(value: str) -> str | None:
    """The local filesystem path a value names (absolute, symlinks and ``..`` resolved), or None
    when it is a URL of another filesystem or service."""
    if value.startswith("sqlite:///"):  # MLflow's store: sqlite:///rel.db, sqlite:////abs.db
        value = value.removeprefix("sqlite:///")
    elif value.startswith("file:"):
        value = urlsplit(value).path
    elif _URL.match(value):
        return None
    return os.path.realpath(os.path.expanduser(value))


def _normalise_root(root: str) -> str:
    local = _local_path(root)
    return local if local is not None else root


def _under(value: str, root: str) -> bool:
    """``value`` is ``root`` or inside it: for paths by whole components, for URLs by prefix
    up to a ``/`` (``s3://b/data`` allows ``s3://b/data/x``, not ``s3://b/data-other``)."""
    local = _local_path(value)
    root_local = _local_path(root)
    if local is not None and root_local is not None:
        return local == root_local or Path(local).is_relative_to(root_local)
    if local is None and root_local is None:
        base = root.rstrip("/")
        return value == base or value.startswith(base + "/")
    return False


def allowed_roots(environ: typing.Mapping[str, str] | None = None) -> list[str]:
    """The roots from $LLMFLOW_ALLOWED_ROOTS, local ones made absolute; unset or empty: the
    default workdir in the current directory."""
    raw = (os.environ if environ is None else environ).get(ROOTS_ENV, "")
    roots = [r.strip() for r in raw.split(SEPARATOR) if r.strip()]
    return [_normalise_root(r) for r in roots or [DEFAULT_ROOT]]


def allowed_dask_addresses(environ: typing.Mapping[str, str] | None = None) -> list[str]:
    raw = (os.environ if environ is None else environ).get(DASK_ENV, "")
    return [a.strip() for a in raw.split(SEPARATOR) if a.strip()]


def config_locations(config: PipelineConfig) -> list[tuple[str, str]]:
    """Every (parameter, value) of the config that names data somewhere, the seeds' web URLs and
    embedded sources left out (they name no file)."""
    found = []
    for dotted in location_fields():
        for parameter, value in _values(config, dotted):
            if dotted in _SOURCE_FIELDS and (
                _EMBEDDED_SEEDS.match(value) or urlsplit(value).scheme in _WEB_SCHEMES
            ):
                continue
            found.append((parameter, value))
    return found


def private_addresses_allowed(environ: typing.Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(PRIVATE_ENV, "") == "1"


def violations(
    config: PipelineConfig,
    roots: list[str],
    dask_addresses: list[str],
    private_allowed: bool = False,
    extra: list[tuple[str, str]] | None = None,
) -> list[str]:
    """One line per parameter that breaks the allow-lists (empty: the run may go ahead);
    ``extra`` are (parameter, path) pairs of the run's other parameters (an ablation's)."""
    problems = []
    web_seeds = [s for s in config.crawl.seeds if urlsplit(s).scheme in _WEB_SCHEMES]
    if config.crawl.allow_private_addresses and web_seeds and not private_allowed:
        problems.append(
            "config.crawl.allow_private_addresses=true would let the crawl reach loopback,"
            " private and link-local addresses (the cloud metadata service among them); set"
            f" {PRIVATE_ENV}=1 or serve with --set crawl.allow_private_addresses=true to allow it"
        )
    for parameter, value in config_locations(config) + (extra or []):
        if not any(_under(value, root) for root in roots):
            problems.append(f"{parameter}={value!r} is outside the allowed roots")
    if config.dask_address and config.dask_address not in dask_addresses:
        allowed = ", ".join(dask_addresses) or "none"
        problems.append(
            f"config.dask_address={config.dask_address!r} is not an allowed Dask scheduler"
            f" (allowed: {allowed}; ${DASK_ENV}, `llmflow serve --allow-dask-address`)"
        )
    return problems


def check_deployment_run(
    config: PipelineConfig, extra: list[tuple[str, str]] | None = None
) -> None:
    """Refuse a deployment run whose parameters break the allow-lists; a no-op outside one.

    Called first thing in the flow, before the dataset lock or the MLflow run touch any file.
    """
    from prefect.runtime import deployment

    if not deployment.id:
        return
    roots = allowed_roots()
    problems = violations(
        config, roots, allowed_dask_addresses(), private_addresses_allowed(), extra
    )
    if problems:
        raise DeploymentParameterError(
            f"deployment run refused: {'; '.join(problems)}. Allowed roots: {', '.join(roots)}"
            f" (${ROOTS_ENV}, set by `llmflow serve` from its workdir, its config and"
            " --allow-root)"
        )


def serve_environment(
    config: PipelineConfig, extra_roots: list[str], dask_addresses: list[str]
) -> dict[str, str]:
    """The allow-lists ``llmflow serve`` hands its flow runs: its workdir, every location its own
    config names (the operator chose those), ``--allow-root``s and what the environment already
    allows; the config's own ``dask_address`` and ``--allow-dask-address``es."""
    roots = [str(Path(config.workdir).absolute())]
    roots += [value for _, value in config_locations(config)]
    roots += extra_roots
    if os.environ.get(ROOTS_ENV):
        roots += allowed_roots()
    addresses = list(dask_addresses) + allowed_dask_addresses()
    if config.dask_address:
        addresses.append(config.dask_address)
    unique_roots = list(dict.fromkeys(_normalise_root(r) for r in roots))
    environment = {
        ROOTS_ENV: SEPARATOR.join(unique_roots),
        DASK_ENV: SEPARATOR.join(dict.fromkeys(addresses)),
    }
    # The operator's own config may allow private addresses (an intranet crawl); only explicitly.
    crawl = config.crawl
    if crawl.allow_private_addresses and "allow_private_addresses" in crawl.model_fields_set:
        environment[PRIVATE_ENV] = "1"
    return environment
