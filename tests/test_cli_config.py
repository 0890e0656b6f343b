"""The command line: overrides parse; bad configs exit 2 naming the key; nothing is written."""

from __future__ import annotations

import re
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
        (
            ["--set", "crawl.max_page=5"],
            "Error: crawl.max_page: unknown key (did you mean 'crawl.max_pages'?)",
        ),
        (
            ["--set", "nosuchstage.x=1"],
            "nosuchstage.x: unknown key (the pipeline config has no field 'nosuchstage')",
        ),
        (
            ["--set", "crawl.max_pages.x=1"],
            "crawl.max_pages.x: unknown key ('crawl.max_pages' has no fields)",
        ),
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
        (
            ["--set", "pretrain.model.hidden_sise=64"],
            "pretrain.model.hidden_sise: unknown key (did you mean 'pretrain.model.hidden_size'?)",
        ),
        # a batch the trainer cannot split into micro-batches: refused before the crawl starts
        (
            ["--set", "pretrain.batch_tokens=5000"],
            "Error: pretrain.batch_tokens: 5000 is not a multiple of micro_batch_size × seq_len"
            " × processes = 16 × 256 × 1 = 4096; nearest valid values: 4096 and 8192",
        ),
        (
            ["--set", "sft.batch_tokens=5000"],
            "Error: sft.batch_tokens: 5000 is not a multiple of micro_batch_size × seq_len"
            " × processes = 16 × 256 × 1 = 4096; nearest valid values: 4096 and 8192",
        ),
        (
            ["--set", "pretrain.nproc_per_node=2"],
            "pretrain.batch_tokens: 4096 is not a multiple of micro_batch_size × seq_len"
            " × processes = 16 × 256 × 2 = 8192; nearest valid value: 8192",
        ),
        (
            ["--set", "pretrain.seq_len=128", "--set", "pretrain.batch_tokens=3000"],
            "pretrain.batch_tokens: 3000 is not a multiple of micro_batch_size × seq_len"
            " × processes = 16 × 128 × 1 = 2048; nearest valid values: 2048 and 4096",
        ),
        (
            ["--set", 'pretrain.model={"max_seq_len": 64}', "--set", "pretrain.batch_tokens=100"],
            "pretrain.batch_tokens: 100 is not a multiple of micro_batch_size × seq_len"
            " × processes = 16 × 64 × 1 = 1024; nearest valid value: 1024",
        ),
        (
            ["--set", "pretrain.preset=huge"],
            "pretrain.preset: Input should be 'tiny', 'gpt2-small', 'llama-1b' or 'auto'"
            " (got 'huge')",
        ),
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
    for leak in ("Value error", "input_value", "{'"):
        assert leak not in result.output


def test_invalid_yaml_and_unknown_yaml_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("crawl: [unclosed\n")
    result = runner.invoke(app, ["run", "--config", str(broken), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "not valid YAML" in result.output and "broken.yaml" in result.output

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("crawl:\n  max_pagez: 3\n")
    with pytest.raises(ConfigError, match=r"crawl.max_pagez: unknown key \(did you mean"):
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


# A config file's mistakes read as --set's do: `<key path>: <what is wrong>`, with a suggestion
# for a misspelt key, and never pydantic's "Value error, " nor the raw input it was given.
BAD_FILES = {
    "crawl:\n  max_pagez: 3\n": "crawl.max_pagez: unknown key (did you mean 'crawl.max_pages'?)",
    "crawl:\n  seeds: []\n  max_pagez: 3\n": "crawl.max_pagez: unknown key (did you mean",
    "pretrain:\n  model:\n    hidden_sise: 64\n": (
        "pretrain.model.hidden_sise: unknown key (did you mean 'pretrain.model.hidden_size'?)"
    ),
    "pretrain:\n  model:\n    num_heads: 3\n": (
        "pretrain.model: hidden_size=128 is not divisible by num_heads=3"
    ),
    "pretrain:\n  model:\n    vocab_size: 64\n": (
        "pretrain.model.vocab_size: set the tokenizer's vocab_size instead"
    ),
    "pretrain:\n  batch_tokens: 5000\n": (
        "pretrain.batch_tokens: 5000 is not a multiple of micro_batch_size × seq_len × processes"
    ),
    "pretrain:\n  sample_prompts: [1]\n": (
        "pretrain.sample_prompts[0]: Input should be a valid string (got 1)"
    ),
    "dedup:\n  exact: false\n  near: false\n": "dedup: exact and near are both off",
    "toxicity:\n  thresholds: {nope: 0.5}\n": "toxicity.thresholds: labels ['nope'] do not exist",
    "tokenizer:\n  vocab_size: 100\n": "tokenizer.vocab_size: vocab_size 100 leaves no room",
    "crawl: 5\n": "crawl: Input should be a valid dictionary or instance of CrawlConfig (got 5)",
    "crawl:\n  max_pages: many\npretrain: 5\n": (
        "Error: crawl.max_pages: Input should be a valid integer, unable to parse string as an"
        " integer (got 'many') Error: pretrain: Input should be a valid dictionary"
    ),
}


@pytest.mark.parametrize("text", list(BAD_FILES))
def test_config_file_errors_name_the_key_path(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    workdir = tmp_path / "work"
    result = runner.invoke(app, ["run", "--config", str(path), "--workdir", str(workdir)])
    assert result.exit_code == 2, result.output
    assert BAD_FILES[text] in " ".join(result.output.split())
    for leak in ("Value error", "input_value", "input_type", "{'"):
        assert leak not in result.output
    # every line is `Error: <key path>: <what is wrong>`
    for line in result.output.strip().splitlines():
        assert re.match(r"Error: [a-z_]+(\.[a-z_]+|\[\d+\])*: \S", line), line
    assert not workdir.exists()


def test_batch_rule_follows_the_model_and_skips_what_the_planner_decides() -> None:
    # preset auto: the planner sets seq_len, micro_batch_size and batch_tokens together
    assert load_config(overrides=["pretrain.preset=auto", "pretrain.batch_tokens=5000"])
    # a valid batch for 2 processes, and SFT under the pretrained model's 64-token context
    config = load_config(
        overrides=[
            "pretrain.nproc_per_node=2",
            "pretrain.batch_tokens=8192",
            'pretrain.model={"max_seq_len": 64}',
            "sft.micro_batch_size=2",
            "sft.batch_tokens=384",
        ]
    )
    assert (config.pretrain.batch_tokens, config.sft.batch_tokens) == (8192, 384)
    with pytest.raises(ConfigError, match=r"^sft.batch_tokens: 100 is not a multiple of .* = 128"):
        load_config(
            overrides=[
                'pretrain.model={"max_seq_len": 64}',
                "sft.micro_batch_size=2",
                "sft.batch_tokens=100",
            ]
        )


def test_a_config_files_workdir_wins_over_the_shown_default(tmp_path: Path) -> None:
    """--workdir's help shows ./llmflow-work, but only a given --workdir overrides the file's."""
    path = tmp_path / "c.yaml"
    path.write_text(f"workdir: {tmp_path / 'from-file'}\n")
    result = runner.invoke(app, ["run", "--config", str(path), "--stages", "normalize"])
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "from-file" / "data") in " ".join(result.output.split()).replace(" ", "")
    given = ["run", "-c", str(path), "--stages", "normalize", "--workdir", str(tmp_path / "cli")]
    result = runner.invoke(app, given)
    assert str(tmp_path / "cli" / "data") in " ".join(result.output.split()).replace(" ", "")
