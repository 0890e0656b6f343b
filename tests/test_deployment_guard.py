"""The deployment guard's rules on real configs and real paths (symlinks included); the refusal of
a run served through Prefect is in tests/test_deployments.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmflow.deployments.pipeline_deployments import preset_parameters
from llmflow.flows.config import PipelineConfig
from llmflow.flows.deployment_guard import (
    DASK_ENV,
    PRIVATE_ENV,
    ROOTS_ENV,
    allowed_roots,
    location_fields,
    serve_environment,
    violations,
)


def test_location_fields_are_read_from_the_models() -> None:
    # Every field that names data somewhere, found from names and descriptions: a new path
    # field in a stage's config shows up here (and is checked) without a list to update.
    assert set(location_fields()) == {
        "workdir",
        "data_root",
        "mlflow_tracking_uri",
        "crawl.seeds",
        "dedup.index_dir",
        "quality_model.reference",
        "quality_model.labels_file",
        "quality_model.model",
        "quality_model.rater",
        "toxicity.detoxify_checkpoint",
        "decontaminate.data_dir",
        "decontaminate.index_dir",
        "toxicity.detoxify_model_dir",
        "sft.data",
        "evaluate.model",
        "evaluate.data_dir",
    }


def test_paths_outside_the_roots_are_named(tmp_path: Path) -> None:
    root = tmp_path / "work"
    (root / "data").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # A symlink inside the root that leads out of it is outside, as is a `..` walk.
    (root / "escape").symlink_to(outside)
    config = PipelineConfig.model_validate(
        {
            "workdir": str(root),
            "data_root": str(root / "escape" / "data"),
            "mlflow_tracking_uri": f"sqlite:///{root}/../mlflow.db",
            "crawl": {
                "seeds": ["https://docs.python.org/3/", "pydoc:", "/etc/passwd", str(root / "x")],
                "allow_private_addresses": False,  # as the deployments set it
            },
            "evaluate": {"model": f"file://{outside}/model"},
            "sft": {"data": "s3://bucket/other/sft.jsonl"},
        }
    )
    problems = violations(config, [str(root), "s3://bucket/data"], [])
    assert problems == [
        f"config.data_root={str(root / 'escape' / 'data')!r} is outside the allowed roots",
        f"config.mlflow_tracking_uri='sqlite:///{root}/../mlflow.db' is outside the allowed roots",
        "config.crawl.seeds[2]='/etc/passwd' is outside the allowed roots",
        "config.sft.data='s3://bucket/other/sft.jsonl' is outside the allowed roots",
        f"config.evaluate.model='file://{outside}/model' is outside the allowed roots",
    ]
    # Under the roots: a path by whole components, a URL by prefix up to a slash.
    inside = config.model_copy(
        update={
            "data_root": str(root / "data"),
            "mlflow_tracking_uri": f"sqlite:///{root}/mlflow.db",
            "evaluate": config.evaluate.model_copy(update={"model": str(root / "sft")}),
            "sft": config.sft.model_copy(update={"data": "s3://bucket/data/sft.jsonl"}),
            "crawl": config.crawl.model_copy(update={"seeds": ["https://example.org/"]}),
        }
    )
    assert violations(inside, [str(root), "s3://bucket/data"], []) == []
    sibling = inside.model_copy(update={"data_root": f"{root}-other"})
    assert violations(sibling, [str(root), "s3://bucket/data"], []) == [
        f"config.data_root='{root}-other' is outside the allowed roots"
    ]


def test_a_dask_address_must_be_allowed(tmp_path: Path) -> None:
    config = PipelineConfig(workdir=str(tmp_path), dask_address="tcp://attacker:8786")
    (problem,) = violations(config, [str(tmp_path)], ["tcp://cluster:8786"])
    assert "config.dask_address='tcp://attacker:8786' is not an allowed Dask scheduler" in problem
    assert "tcp://cluster:8786" in problem
    allowed = config.model_copy(update={"dask_address": "tcp://cluster:8786"})
    assert violations(allowed, [str(tmp_path)], ["tcp://cluster:8786"]) == []


def test_serve_allows_its_own_config_and_the_extra_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.delenv(DASK_ENV, raising=False)
    seed = tmp_path / "seeds" / "a.txt"
    config = PipelineConfig.model_validate(
        {
            "workdir": str(tmp_path / "work"),
            "dask_address": "tcp://cluster:8786",
            "crawl": {"seeds": [str(seed), "https://example.org/"]},
        }
    )
    env = serve_environment(config, ["s3://bucket/llmflow"], [])
    assert env[ROOTS_ENV].split(",") == [
        str(tmp_path / "work"),
        str(seed),
        "s3://bucket/llmflow",
    ]
    assert env[DASK_ENV] == "tcp://cluster:8786"
    # The served config, as its deployments hand it to their runs, passes the check they get.
    served = PipelineConfig.model_validate(preset_parameters("pipeline", config)["config"])
    assert served.crawl.allow_private_addresses is False
    assert violations(served, allowed_roots(env), env[DASK_ENV].split(",")) == []
    # Unset: the default workdir in the flow run's working directory, nothing else.
    monkeypatch.chdir(tmp_path)
    assert allowed_roots({}) == [str(tmp_path / "llmflow-work")]


def test_a_run_may_not_turn_the_private_address_guard_off(tmp_path: Path) -> None:
    """Deployment runs crawl the web with private, loopback and link-local addresses refused
    (169.254.169.254 is the cloud metadata service); a run's parameters cannot undo that."""
    web = PipelineConfig.model_validate(
        {"workdir": str(tmp_path), "crawl": {"seeds": ["https://example.org/"]}}
    )
    preset = PipelineConfig.model_validate(preset_parameters("data-refresh", web)["config"])
    assert preset.crawl.allow_private_addresses is False
    assert violations(preset, [str(tmp_path)], []) == []
    reopened = preset.model_copy(
        update={"crawl": preset.crawl.model_copy(update={"allow_private_addresses": True})}
    )
    (problem,) = violations(reopened, [str(tmp_path)], [])
    assert "config.crawl.allow_private_addresses=true" in problem and PRIVATE_ENV in problem
    assert violations(reopened, [str(tmp_path)], [], private_allowed=True) == []
    # The operator's own explicit choice is kept, and its runs are allowed it.
    intranet = PipelineConfig.model_validate(
        {
            "workdir": str(tmp_path),
            "crawl": {"seeds": ["http://wiki.internal/"], "allow_private_addresses": True},
        }
    )
    assert preset_parameters("pipeline", intranet)["config"]["crawl"]["allow_private_addresses"]
    assert serve_environment(intranet, [], [])[PRIVATE_ENV] == "1"
    # The embedded default's own localhost site (pydoc:) needs no such permission.
    assert violations(PipelineConfig(workdir=str(tmp_path)), [str(tmp_path)], []) == []
