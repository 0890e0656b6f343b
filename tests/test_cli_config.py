"""The command line: overrides parse; bad configs exit 2 naming the key; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.flows.config import STAGES, ConfigError, DataLayout, load_config, resolve_stages

runner = CliRunner()


def test_set_overrides_parse_json_else_string(tmp_path: Path) -> None:
    config = load_config(
        overrides=[
            "crawl.max_pages=50",
            'crawl.seeds=["http://127.0.0.1:8000/"]',
            "experiment=my-exp",
            "crawl.respect_robots_txt=false",
        ],
        workdir=str(tmp_path),
    )
    assert config.crawl.max_pages == 50
    assert config.crawl.seeds == ["http://127.0.0.1:8000/"]
    assert config.experiment == "my-exp"
    assert config.crawl.respect_robots_txt is False
    assert config.workdir == str(tmp_path)
    layout = DataLayout.of(config)  # reads the documents version once; the config never does
    assert layout.stage_dir("crawl") == f"{tmp_path.absolute()}/data/documents/v0001/crawl"
    assert layout.stage_dir("tokenize") == f"{tmp_path.absolute()}/data/tokenize"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("crawl:\n  max_pages: 7\n  max_depth: 1\nnormalize:\n  min_chars: 20\n")
    config = load_config(path, ["crawl.max_pages=9"])
    assert (config.crawl.max_pages, config.crawl.max_depth) == (9, 1)
    assert config.normalize.min_chars == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "crawl.max_page=5"], "unknown key 'crawl.max_page'"),
        (["--set", "crawl.max_page=5"], "did you mean 'crawl.max_pages'"),
        (["--set", "nosuchstage.x=1"], "unknown key 'nosuchstage.x'"),
        (["--set", "crawl.max_pages.x=1"], "'crawl.max_pages' has no fields"),
        (["--set", "crawl.max_pages=many"], "crawl.max_pages: Input should be a valid integer"),
        (
            ["--set", "crawl.max_pages=0"],
            "crawl.max_pages: Input should be greater than or equal to 1",
        ),
        (["--set", "crawl.max_pages"], "expected KEY=VALUE"),
        (["--stages", "crawl,train"], "unknown stage(s) train"),
        (["--stages", "normalize"], "reads the 'crawl' output"),
        (["--stages", "tokenize"], "reads the 'documents' output"),
        (["--stages", "pretrain"], "'pretrain' reads the 'tokenize' output"),
        (["--set", "pretrain.model.hidden_sise=64"], "hidden_sise"),
        (["--set", "tokenizer.vocab_size=100"], "tokenizer.vocab_size"),
        # JSON's Infinity and NaN parse to floats: refused, not trained with
        (["--set", "pretrain.lr=Infinity"], "pretrain.lr: Input should be a finite number"),
        (
            ["--set", "quality.min_lang_score=NaN"],
            "quality.min_lang_score: Input should be a finite",
        ),
        (["--set", "experiment="], "experiment: String should have at least 1 character"),
    ],
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    workdir = tmp_path / "work"
    result = runner.invoke(app, ["run", "--workdir", str(workdir), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not workdir.exists()


def test_invalid_yaml_and_unknown_yaml_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("crawl: [unclosed\n")
    result = runner.invoke(app, ["run", "--config", str(broken), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "not valid YAML" in result.output and "broken.yaml" in result.output

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("crawl:\n  max_pagez: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'crawl.max_pagez'"):
        load_config(unknown)
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read it" in result.output

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    result = runner.invoke(app, ["run", "--config", str(latin1), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    assert "latin1.yaml: not UTF-8 text" in " ".join(result.output.split())
    assert not (tmp_path / "w").exists()


def test_stages_are_run_in_pipeline_order() -> None:
    assert resolve_stages("normalize,crawl") == ["crawl", "normalize"]
    assert resolve_stages("dedup,crawl") == ["crawl", "dedup"]
    assert resolve_stages(None) == list(STAGES)
    assert STAGES[:2] == ("crawl", "normalize")


def test_help_reads_well() -> None:
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--set", "--stages", "--workdir"):
        assert option in result.output
