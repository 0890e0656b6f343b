"""`llmflow run` end to end: a real Prefect server, real MLflow on SQLite, a real crawl of pydoc.

Runs the command twice on the same workdir: the first goes from the crawl through a pretrained
and an instruction-tuned (very small) model to its benchmark scores, the second must find every
unit complete, do no work, and leave the manifests byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from conftest import run_llmflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from llmflow.flows.config import STAGES, DataLayout, PipelineConfig
from llmflow.tasks.core import shards
from llmflow.tasks.core.progress import stage_key
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.registry import GRAPH

pytestmark = pytest.mark.server  # a Prefect server and `llmflow run`

MAX_PAGES = 12
# Prose that passes the quality rules, in two near-identical copies, one with an e-mail address;
# and a rant that passes them too but not the toxicity filter.
PROSE = (
    "The harbour town wakes early in the autumn. Fishermen carry their nets down to the boats"
    " while the bakers open their shutters and the smell of fresh bread drifts along the quay."
    " Children walk to the school on the hill, and their teachers wait at the gate with a word"
    " for each of them. By noon the market is full of people who have come from the villages"
    " to sell apples, cheese and wool. In the evening the old men sit outside the inn and talk"
    " about the weather, the price of fish and the new road that the council has promised for"
    " many years. When the lamps are lit the town grows quiet again, and only the sea is heard."
)
# A page quoting the first HellaSwag item of the shipped subset (its context and gold ending).
HELLASWAG_0 = (
    "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing on a roof."
)
QUIZ = (
    "Every spring the volunteers at the community centre repair one house for a family in need."
    " This year they began with the roof, and the video they filmed of the work starts like this. "
    + HELLASWAG_0
    + " After that the crew laid new felt, nailed down fresh shingles in neat rows and cleared the"
    " gutters. By the evening the family could sleep dry again, and the volunteers shared a pot"
    " of soup in the kitchen before they went home. Next month they plan to paint the fence and"
    " mend the broken steps at the front door."
)
NEAR_COPY = PROSE.replace("autumn", "spring").replace("apples", "pears").replace("old", "young")
RANT = (
    "This is a fucking disgrace and every one of those idiots should be ashamed of themselves."
    " The shit they sold us broke after a day, the fucking manager laughed at us, and the whole"
    " damn shop is run by assholes who do not care about anyone. I told them what I think of"
    " their crap, and I will tell everyone I know to stay away from that bloody place for good."
    " The fucking bastards took our money and then they shouted at my mother in the street."
    " Nobody should ever buy a single damn thing from those lying pricks again, not ever."
)


def test_pipeline_runs_through_prefect_and_mlflow_then_skips_finished_work(
    prefect_api: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    notes = tmp_path / "notes.txt"
    notes.write_text("A local note.\r\nIt  has\u00a0odd   spacing.\r\n", encoding="utf-8")
    (tmp_path / "harbour.txt").write_text(PROSE + " Write to jane.doe@example.org.\n")
    (tmp_path / "harbour-copy.txt").write_text(NEAR_COPY + " Write to jane.doe@example.org.\n")
    (tmp_path / "rant.txt").write_text(RANT + "\n")
    (tmp_path / "quiz.txt").write_text(QUIZ + "\n")
    names = ("harbour.txt", "harbour-copy.txt", "rant.txt", "quiz.txt")
    files = [str(tmp_path / n) for n in names]
    seeds = json.dumps(["pydoc:", str(notes), *files])
    args = [
        "--workdir",
        str(workdir),
        "--set",
        f"crawl.seeds={seeds}",
        "--set",
        f"crawl.max_pages={MAX_PAGES}",
        "--set",
        "crawl.politeness_delay_s=0",
        "--set",
        "crawl.max_depth=1",
        # A model that trains in seconds on the few documents that survive curation here; almost
        # no held-out split, so that the one or two documents left are not all held out.
        "--set",
        "tokenize.val_fraction=0.001",
        "--set",
        'pretrain.model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 32}',
        "--set",
        "pretrain.micro_batch_size=2",
        "--set",
        "pretrain.batch_tokens=64",
        "--set",
        "pretrain.max_steps=4",
        "--set",
        "pretrain.checkpoint_interval=2",
        # SFT on the shipped conversations (cut to the 32-token context), evaluation on the
        # shipped benchmark subsets: a few items of each task
        "--set",
        "sft.micro_batch_size=2",
        "--set",
        "sft.batch_tokens=64",
        "--set",
        "sft.max_steps=4",
        "--set",
        "sft.checkpoint_interval=2",
        "--set",
        "sft.eval_interval=2",
        # the page quoting a benchmark item is kept and flagged, so evaluation has a clean subset
        "--set",
        "decontaminate.mode=flag",
        "--set",
        "evaluate.limit=3",
        "--set",
        "evaluate.max_new_tokens=4",
    ]
    first = run_llmflow(args, prefect_api, cwd=tmp_path)

    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))
    crawl_dir, normalize_dir = layout.stage_dir("crawl"), layout.stage_dir("normalize")
    assert crawl_dir == str(workdir / "data" / "documents" / "v0001" / "crawl")
    crawl_manifest = shards.read_manifest(crawl_dir)
    normalize_manifest = shards.read_manifest(normalize_dir)
    crawl_counts = crawl_manifest["counts"]
    # Every page fetched is either kept, rejected or a fetch failure; the note is one more doc.
    assert crawl_counts["kept"] + crawl_counts["rejected"] == crawl_counts["docs_in"]
    assert 6 <= crawl_counts["kept"] <= MAX_PAGES + 5  # pages and the five files
    assert {s["path"].split("-")[0] for s in crawl_manifest["shards"]} == {
        "web.parquet",
        "notes",
        "harbour",
        "rant",
        "quiz",
    }
    docs = list(shards.iter_documents(crawl_dir))
    web_urls = [d["url"] for d in docs if d["source"] == "http"]
    # pydoc's pages are kept as pydoc:<path>, whatever port its server had this run
    assert web_urls and all(u.startswith("pydoc:") for u in web_urls)
    assert not any("antigravity" in u or "/this.html" in u for u in web_urls)
    assert any("Python" in d["text"] or "module" in d["text"] for d in docs)
    assert (Path(crawl_dir) / "warc" / "web.warc.gz").stat().st_size > 0

    assert normalize_manifest["counts"]["docs_in"] == crawl_counts["kept"]
    normalized = {d["id"]: d["text"] for d in shards.iter_documents(normalize_dir)}
    note_doc = next(d for d in docs if (d["url"] or "").endswith("notes.txt"))
    assert normalized[note_doc["id"]] == "A local note.\nIt has odd spacing."
    assert all(stage in first.stdout for stage in STAGES)

    # The curation stages: each removal is in its stage's rejected set with its reason.
    def rejected(stage: str) -> list[dict]:
        stage_dir = layout.stage_dir(stage)
        manifest = shards.read_manifest(stage_dir)
        return [
            row
            for shard in shards.manifest_shards(manifest, "rejected_shards")
            for row in shards.read_shard(stage_dir, shard).to_pylist()
        ]

    by_name = {Path(d["url"] or "").name: d["id"] for d in docs if d["source"] == "file"}
    quality_rejected = {r["id"]: r["reason"] for r in rejected("quality")}
    assert by_name["notes.txt"] in quality_rejected  # a two-line note is not a document
    assert not {by_name[n] for n in ("harbour.txt", "harbour-copy.txt", "rant.txt")} & set(
        quality_rejected
    )
    near = [r for r in rejected("dedup") if r["reason"] == "near_duplicate"]
    assert {r["id"] for r in near} & {by_name["harbour.txt"], by_name["harbour-copy.txt"]}
    toxic = {r["id"]: r["reason"] for r in rejected("toxicity")}
    assert toxic.get(by_name["rant.txt"]) == "toxic_profanity"
    # The quality model, trained on the shipped conversations against the crawl, scored every
    # document it saw and removed none (keep: all, the default).
    scored = list(shards.iter_documents(layout.stage_dir("quality_model")))
    assert scored and all(0 <= d["quality_model_score"] <= 1 for d in scored)
    assert not rejected("quality_model")
    pii_docs = list(shards.iter_documents(layout.stage_dir("pii")))
    # decontaminate flagged the page quoting a HellaSwag item and kept it (mode: flag)
    decontaminated = list(shards.iter_documents(layout.stage_dir("decontaminate")))
    assert {d["id"] for d in decontaminated} == {d["id"] for d in pii_docs}
    flagged = {d["id"]: d["benchmark_items"] for d in decontaminated if d["benchmark_items"]}
    assert flagged == {by_name["quiz.txt"]: ["hellaswag/0"]}
    decontaminate_manifest = shards.read_manifest(layout.stage_dir("decontaminate"))
    assert decontaminate_manifest["stats"]["overlap_documents.hellaswag"] == 1
    # the first version of the documents is the decontaminate stage's output
    assert {d["id"] for d in shards.iter_documents(layout.stage_dir("documents"))} == {
        d["id"] for d in decontaminated
    }
    harbour = {by_name["harbour.txt"], by_name["harbour-copy.txt"]}
    (kept,) = [d for d in pii_docs if d["id"] in harbour]  # dedup kept one of the two
    assert "jane.doe@example.org" not in kept["text"] and "<EMAIL>" in kept["text"]
    assert kept["pii_counts"]["email"] == 1
    assert "Prefect UI:  open http" in first.stdout and " ui --workdir " in first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout

    # MLflow: one parent run tagged with the Prefect flow run, a child per stage with its counts.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["crawl.max_pages"] == str(MAX_PAGES)
    children = {r.data.tags["llmflow.stage"]: r for r in runs if r not in parents}
    assert set(children) == set(STAGES)
    # every stage names the documents version it worked from; the models through the token shards
    assert {r.data.tags["llmflow.documents_version"] for r in children.values()} == {"v0001"}
    assert parent.data.tags["llmflow.documents_version"] == "v0001"
    stage_dirs = {stage: layout.stage_dir(stage) for stage in STAGES}
    for stage, stage_dir in stage_dirs.items():
        if GRAPH[stage].step is not None:
            continue  # one step over the whole input, no document counts: checked below
        manifest = shards.read_manifest(stage_dir)
        child = children[stage]
        assert child.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.data.metrics["counts/docs_kept"] == manifest["counts"]["kept"]
        assert child.data.metrics["counts/docs_in"] == manifest["counts"]["docs_in"]
        assert child.data.metrics["units_skipped"] == 0
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"manifest.json", "rejected_sample.json"} <= artifacts
    assert children["crawl"].data.params["max_pages"] == str(MAX_PAGES)
    model_run = children["quality_model"]
    assert model_run.data.metrics["model.labelled_positives"] == 307  # the shipped set
    negatives = model_run.data.metrics["model.labelled_negatives"]
    assert 5 <= negatives <= normalize_manifest["counts"]["kept"]
    model_files = {a.path for a in client.list_artifacts(model_run.info.run_id, "quality_model")}
    assert {f"quality_model/{n}" for n in ("model.json", "weights.npy", "metrics.json")} <= (
        model_files
    )

    # The tokenizer, the token shards and a checkpoint with its curves, export and artifacts.
    tokens = shards.read_manifest(stage_dirs["tokenize"])
    assert tokens["tokens"]["train"] > 0
    assert tokens["tokens"]["train"] == sum(s["tokens"] for s in tokens["token_shards"]["train"])
    assert children["tokenizer"].data.metrics["bytes_per_token"] > 1
    trained = json.loads((workdir / "data" / "pretrain" / "manifest.json").read_text())
    run_dir = workdir / "data" / "pretrain" / trained["run_dir"]
    assert trained["result"]["steps"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-000002",
        "step-000004",
    ]
    assert (run_dir / "hf" / "model.safetensors").exists()
    assert json.loads((run_dir / "job.json").read_text())["run_dir"] == str(run_dir)
    pretrain_run = children["pretrain"]
    history = client.get_metric_history(pretrain_run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "unigram_entropy"} <= set(pretrain_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(pretrain_run.info.run_id)}
    assert {"checkpoint", "hf_model", "tokenizer", "metrics.jsonl", "manifest.json"} <= artifacts
    charts = {a.path for a in client.list_artifacts(pretrain_run.info.run_id, "charts")}
    assert charts == {"charts/training_curves.png"}
    parent_charts = {a.path for a in client.list_artifacts(parent.info.run_id, "charts")}
    assert parent_charts == {"charts/data_funnel.png"}
    png = client.download_artifacts(parent.info.run_id, "charts/data_funnel.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inputs = {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags})
        for d in client.get_run(pretrain_run.info.run_id).inputs.dataset_inputs
    }
    assert set(inputs) == {"tokenize", "tokenizer", "documents"}
    assert inputs["tokenize"][0] == manifest_sha256(stage_dirs["tokenize"])[:36]
    # the documents version the token shards were cut from, by its manifest's digest
    version_file = workdir / "data" / "documents" / "versions" / "v0001.json"
    assert inputs["documents"][0] == hashlib.sha256(version_file.read_bytes()).hexdigest()[:36]
    assert inputs["tokenize"][1]["mlflow.data.context"] == "training"
    exported = {a.path for a in client.list_artifacts(pretrain_run.info.run_id, "hf_model")}
    assert {"hf_model/config.json", "hf_model/tokenizer.json"} <= exported
    assert "pretrain" in first.stdout and "steps" in first.stdout

    # SFT from that checkpoint: its own curve, the conversations as a training input.
    tuned = json.loads((workdir / "data" / "sft" / "manifest.json").read_text())
    assert tuned["result"]["steps"] == 4 and tuned["data"]["conversations"] > 200
    assert tuned["result"]["checkpoint"].endswith("step-000004")
    sft_run = children["sft"]
    history = client.get_metric_history(sft_run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert {"val_loss", "train_rows", "conversations"} <= set(sft_run.data.metrics)
    assert sft_run.data.tags["llmflow.init_checkpoint"].startswith(str(run_dir))
    sft_inputs = {d.dataset.name for d in client.get_run(sft_run.info.run_id).inputs.dataset_inputs}
    assert sft_inputs == {"pretrain", "tokenizer", "instructions", "documents"}

    # Evaluation of the SFT model: every shipped task, as MLflow metrics and a table artifact.
    evaluation = json.loads((workdir / "data" / "evaluate" / "manifest.json").read_text())
    assert evaluation["config"]["model"].startswith(str(workdir / "data" / "sft"))
    assert set(evaluation["results"]) == set(PipelineConfig().evaluate.tasks)
    # --limit counts per MMLU subject, as lm-eval's does (four subjects are shipped)
    assert {t: r["items"] for t, r in evaluation["results"].items()} == {
        t: 12 if t == "mmlu" else 3 for t in evaluation["results"]
    }
    assert len(evaluation["samples"]) == len(PipelineConfig().evaluate.chat_prompts)
    eval_run = children["evaluate"]
    for task, result in evaluation["results"].items():
        for metric, value in result["metrics"].items():
            assert eval_run.data.metrics[f"eval/{task}/{metric}"] == value
    assert 0 <= eval_run.data.metrics["eval/hellaswag/acc_norm"] <= 1
    assert "eval_results.json" in {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert "evaluate" in first.stdout and "hellaswag acc_norm" in first.stdout
    # the evaluated model is in the registry: the SFT run's export, with its scores as tags
    (version,) = client.search_model_versions("name = 'llmflow-sft'")
    assert version.run_id == sft_run.info.run_id == tuned["mlflow_run_id"]
    assert version.source.endswith("/hf_model")
    piqa = evaluation["results"]["piqa"]["metrics"]["acc_norm"]
    assert float(version.tags["eval/piqa/acc_norm"]) == pytest.approx(piqa, abs=1e-5)
    assert eval_run.data.tags["llmflow.registered_model"] == f"llmflow-sft/{version.version}"
    # The model trained on the flagged page: HellaSwag item 0 is contaminated, the clean score
    # is the mean over items 1 and 2; every other task has no contaminated item.
    metrics = eval_run.data.metrics
    assert metrics["eval/hellaswag/contaminated_items"] == 1
    assert metrics["eval/hellaswag/clean_items"] == 2
    per_item = evaluation["results"]["hellaswag"]["item_values"]["acc_norm"]
    assert evaluation["results"]["hellaswag"]["item_ids"] == ["0", "1", "2"]
    assert metrics["eval/hellaswag/clean/acc_norm"] == pytest.approx(sum(per_item[1:]) / 2)
    for task in evaluation["results"]:
        if task != "hellaswag":
            assert metrics[f"eval/{task}/contaminated_items"] == 0
            acc = evaluation["results"][task]["metrics"]["acc"]
            assert metrics[f"eval/{task}/clean/acc"] == pytest.approx(acc)
    # CORE: accuracy centred on chance, averaged over the tasks; logged, tagged, printed
    centred = []
    for result in evaluation["results"].values():
        accuracy = result["metrics"].get("acc_norm", result["metrics"]["acc"])
        centred.append((accuracy - result["chance"]) / (1 - result["chance"]))
    assert metrics["eval/core"] == pytest.approx(sum(centred) / len(centred))
    assert float(version.tags["eval/core"]) == pytest.approx(metrics["eval/core"], abs=1e-5)
    assert set(version.tags["llmflow.core_tasks"].split(",")) == set(evaluation["results"])
    assert "CORE" in first.stdout and "contaminated items: hellaswag 1" in first.stdout

    # Prefect knows the flow run MLflow points at, and it completed.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["labels"]["mlflow.run_id"] == parent.info.run_id  # linked both ways
    # one subflow per phase, each its own flow in the UI, with its own task runs and artifacts
    subflows = httpx.post(
        f"{prefect_api}/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
        timeout=10,
    ).json()
    flows = {
        httpx.get(f"{prefect_api}/flows/{run['flow_id']}", timeout=10).json()["name"]
        for run in subflows
    }
    assert flows == {"llmflow-data", "llmflow-train", "llmflow-evaluate"}
    assert all(run["state"]["type"] == "COMPLETED" for run in subflows)
    run_ids = [flow_run_id, *(run["id"] for run in subflows)]
    found = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": run_ids}}},
        timeout=10,
    ).json()
    keys = {a["key"] for a in found}
    # one artifact per purpose, keyed in stage order
    assert {"07-pii-funnel", "09-tokenizer-summary", "11-pretrain-summary"} <= keys
    assert {"11-pretrain-steps", "12-sft-summary", "12-sft-steps", "13-evaluate-results"} <= keys
    assert {stage_key(f"{s}-funnel", s) for s in STAGES if GRAPH[s].step is None} <= keys
    funnel = next(a for a in found if a["key"] == "06-toxicity-funnel")["data"]
    assert "| removed: toxic_profanity | 1 |" in funnel

    # Second run: nothing to do, identical manifests, shards untouched.
    manifests_before = {d: (Path(d) / "manifest.json").read_bytes() for d in stage_dirs.values()}
    shard_times = {p: p.stat().st_mtime_ns for p in (workdir / "data").rglob("*.parquet")}
    second = run_llmflow(args, prefect_api, cwd=tmp_path)
    assert "Nothing to do" in second.stdout
    for d, before in manifests_before.items():
        assert (Path(d) / "manifest.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in shard_times} == shard_times
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    newest_parent = next(r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags)
    assert newest_parent.info.run_id != parent.info.run_id
    # a run with nothing to do is one MLflow run, the parent, naming the stages it skipped
    newest = newest_parent.info.run_id
    assert not [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == newest]
    assert newest_parent.data.tags["llmflow.stages_skipped"] == ",".join(STAGES)
    # the same model evaluated again is the same registered version, not a new one
    assert len(client.search_model_versions("name = 'llmflow-sft'")) == 1
