"""The `prunelab` command line: parse, call one library function per command, print with rich.

Nothing here computes anything; each command is a thin shell over a library function so
that everything the CLI does is also a Python call away. User errors (`PrunelabError`)
print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional  # noqa: F401  (typer needs Optional in some annotations)

import typer
from rich.console import Console

from prunelab.errors import PrunelabError
from prunelab.pruning.registry import methods_help

app = typer.Typer(
    name="prunelab",
    help="Make a transformer sparse, and measure what it cost and what it bought.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line
out = Console()
_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _STATE["debug"] = debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def fail(message: str) -> None:
    """Print a one-line error and exit 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------
# Commands. Each one: parse options, call one library function, print a short summary.
# ---------------------------------------------------------------------------------------------


@app.command()
def models() -> None:
    """List the offline zoo models."""
    from rich.table import Table

    from prunelab.models.zoo import ZOO

    table = Table("spec", "package", "description")
    for alias, entry in ZOO.items():
        table.add_row(f"zoo:{alias}", entry.package, entry.description)
    out.print(table)


def _print_study_summary(summary: object) -> None:
    s = summary  # prunelab.study.StudySummary
    out.print(
        f"study {s.out_dir}: {s.planned} cells planned, {s.skipped} already done, {s.done} done now, "  # type: ignore[attr-defined]
        f"{s.failed} failed; wall time {s.wall_s:.1f} s ({s.executor} executor)",  # type: ignore[attr-defined]
        highlight=False,
    )
    for label, error in s.failures[:20]:  # type: ignore[attr-defined]
        console.print(f"  [red]failed[/] {label}: {error}", highlight=False)
    if len(s.failures) > 20:  # type: ignore[attr-defined]
        console.print(f"  ... and {len(s.failures) - 20} more (see `prunelab results`)")  # type: ignore[attr-defined]


@app.command()
def study(
    config: Path | None = typer.Argument(None, help="Study YAML (models, methods, sparsities, ...); none = default."),
    out_dir: Path = typer.Option(..., "--out", help="Study directory (results.sqlite, logs, checkpoints)."),
    preset: str | None = typer.Option(None, "--preset", help="Data sizes: quick or default."),
    executor: str = typer.Option("local", "--executor", help="local or ray."),
    jobs: int = typer.Option(1, "--jobs", help="Cells at once with the local executor."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs still written)."),
) -> None:
    """Run (or resume) a grid of models x methods x patterns x sparsities x benchmarks."""
    from prunelab.study import run_study

    summary = run_study(str(config) if config else None, out_dir, preset=preset, executor=executor, jobs=jobs,
                        address=address, progress=not no_progress)
    _print_study_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def results(
    out_dir: Path = typer.Argument(..., help="Study directory."),
    csv: Path | None = typer.Option(None, "--csv", help="Also write every row as CSV here."),
    all_rows: bool = typer.Option(False, "--all", help="Every stored row, not only the last study's plan."),
) -> None:
    """Show the results store of a study; optionally export it as CSV."""
    from rich.table import Table

    from prunelab.study import Store, export_csv

    with Store(out_dir, create=False) as store:
        rows = store.rows() if all_rows else store.plan_rows()
    table = Table("kind", "model", "method", "sparsity", "bench", "status", "value", "wall s")
    for r in rows:
        value = r.metrics.get("value") if r.kind == "bench" else r.metrics.get("achieved_sparsity_prunable")
        table.add_row(r.kind, r.model.split("/")[-1], r.method_label, f"{r.sparsity:g}", r.bench, r.status,
                      "" if value is None else f"{value:.4g}", "" if r.wall_s is None else f"{r.wall_s:.1f}")
    out.print(table)
    if csv is not None:
        path = export_csv(rows, csv)
        out.print(f"wrote {len(rows)} rows to {path}", highlight=False)


@app.command()
def report(out_dir: Path = typer.Argument(..., help="Study directory.")) -> None:
    """Write DIR/report.md and a self-contained DIR/report.html from a study's results."""
    from prunelab.report import build_report

    paths = build_report(out_dir)
    out.print(f"report: {paths['html']} ({paths['figures']} figures) and {paths['markdown']}", highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("prunelab-demo"), "--out", help="Where the study and report go."),
    preset: str = typer.Option("default", "--preset", help="Data sizes: quick or default."),
    jobs: int = typer.Option(0, "--jobs", help="Cells at once (0 = one worker per core, at most 2)."),
) -> None:
    """The main job: the offline default study (3 zoo models), then its report."""
    import time as _time

    from prunelab.report import build_report
    from prunelab.study import run_study

    t0 = _time.perf_counter()
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))  # 2 single-thread workers beat 1 two-thread one
    summary = run_study(None, out_dir, preset=preset, jobs=jobs)
    _print_study_summary(summary)
    paths = build_report(out_dir)
    wall = _time.perf_counter() - t0
    out.print(f"demo finished in {wall / 60:.1f} min ({wall:.0f} s wall time)", highlight=False)
    out.print(f"report: {paths['html'].resolve()} ({paths['figures']} figures)", highlight=False)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def size(
    directory: Path = typer.Argument(..., help="A sparse checkpoint (--format sparse), or an HF checkpoint "
                                     "(then sizes are what --format sparse would store)."),
    by_type: bool = typer.Option(False, "--by-type", help="One row per module type instead of per tensor."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the full report as JSON here."),
) -> None:
    """Per-tensor stored size vs dense and vs the bitmask / entropy bounds, with totals."""
    from prunelab.io import write_json
    from prunelab.storage import size_report, size_tables

    rep = size_report(directory)
    for table in size_tables(rep, by_type=by_type):
        out.print(table)
    if json_out is not None:
        write_json(json_out, rep)
        out.print(f"report: {json_out}", highlight=False)


@app.command()
def prune(
    model: str = typer.Argument(..., help="Model spec: zoo:<alias>, a local HF directory, a .gguf file or a hub id."),
    method: str = typer.Option("wanda", "--method", "-m", help=f"Pruning method: {methods_help()}."),
    sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="Fraction of prunable weights to zero, in [0, 1)."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or N:M (N zeros in every M inputs)."),
    calib: str | None = typer.Option(None, "--calib", help="Text file, .tsv/.jsonl (with --calib-column) or HF "
                                     "dataset name; default: MRPC training sentences."),
    calib_column: str | None = typer.Option(None, "--calib-column", help="Column of a .tsv/.jsonl/HF dataset."),
    nsamples: int = typer.Option(64, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window (capped at the model context)."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    owl: bool = typer.Option(False, "--owl", help=f"Outlier-weighted per-block sparsities ({methods_help(owl=True)})."),
    refine: str | None = typer.Option(None, "--refine", help="Refine the method's masks afterwards: swap (kept/pruned "
                                      f"swaps per row that lower its layer error; {methods_help(refine=True)})."),
    structured_target: str | None = typer.Option(None, "--structured-target", help="structured: remove MLP neurons "
                                                 "(mlp, the default), KV-head groups (heads) or both."),
    opts: list[str] = typer.Option([], "--opt", help="A method option KEY=VALUE (repeatable), e.g. blocksize=64 "
                                   "(sparsegpt), owl_lambda=0.1 (with --owl); a wrong key lists the method's options."),
    fmt: str = typer.Option("hf", "--format", help="hf (save_pretrained, safetensors) or sparse (compressed)."),
    quant: str | None = typer.Option(None, "--quant", help="Quantize the kept weights: int8 (per output channel) "
                                     "or int4 (groups); GPTQ inside sparsegpt/alps, round-to-nearest otherwise; "
                                     "the LM head int8 per row. Store with --format sparse."),
    group_size: int | None = typer.Option(None, "--group-size", help="Input columns per scale (int4: 128)."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    offload: str = typer.Option("auto", "--offload", help="disk: read, prune and write one block at a time (models "
                                "larger than memory); none: load the whole model; auto: disk when the float32 "
                                "weights exceed --max-memory."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget for the weights, e.g. 4GB "
                                          "(default: 80 percent of the memory available now)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (a GPU when there is one): where "
                               "calibration, Hessians and the weight solve run."),
    recover_mode: str | None = typer.Option(None, "--recover", help="Train the kept weights afterwards, mask fixed: "
                                            "block (each block against the dense block), distill (the dense model "
                                            "teaches end to end) or block+distill."),
    tokens: int = typer.Option(100_000, "--tokens", help="Distillation tokens (with --recover distill)."),
    data: str = typer.Option("calib", "--data", help="Distillation text: calib (the calibration source), generated "
                             "(sampled from the dense model) or a text file."),
) -> None:
    """Prune a model and write the checkpoint plus DIR/prune_report.json."""
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from prunelab.models.offload import parse_bytes
    from prunelab.pruning import PruneConfig, save_pruned
    from prunelab.pruning import prune as run_prune
    from prunelab.pruning.offload import prune_to_disk
    from prunelab.pruning.registry import parse_options
    from prunelab.storage import load

    if fmt not in ("hf", "sparse"):
        fail(f"unknown --format '{fmt}': use hf or sparse")
    settings = parse_options(opts) | ({"target": structured_target} if structured_target is not None else {})
    settings |= {"refine": refine} if refine is not None else {}
    settings |= {"quant": quant, "group_size": group_size} if quant is not None or group_size is not None else {}
    config = PruneConfig.from_settings(method, sparsity=sparsity, pattern=pattern, calib=calib,
                                       calib_column=calib_column, nsamples=nsamples, seqlen=seqlen, seed=seed, owl=owl,
                                       **settings)
    recovery = _recovery_config(recover_mode, tokens, data, device) if recover_mode is not None else None
    t0 = _time.perf_counter()
    budget = parse_bytes(max_memory) if max_memory is not None else None
    lm = load(model, offload=offload, device=device, max_memory=budget)
    if lm.offload is not None and fmt != "hf":
        fail("--offload disk writes --format hf (one shard per block); convert afterwards with --offload none")
    if lm.offload is not None and recovery is not None:
        fail("--recover trains the model in memory: use --offload none (or recover the pruned checkpoint later)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"{method} {pattern}", total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=f"{method}: {message}", completed=done, total=total)

        if lm.offload is not None:
            result = prune_to_disk(lm, config, out_dir, progress=progress)
        elif recovery is not None:
            from prunelab.recovery.pipeline import prune_and_recover

            result = prune_and_recover(lm, config, recovery, lambda: load(model, device=device),
                                       state_dir=_recovery_state(out_dir), progress=progress)
        else:
            result = run_prune(lm, config, progress=progress)
    if lm.offload is None:
        save_pruned(lm, result, out_dir, format=fmt, extra={"wall_time_s": _time.perf_counter() - t0})
    if recovery is not None:
        _print_recovery(result.extra["recovery"])
        _drop_recovery_state(out_dir)
    _print_prune_summary(model, f"{method} {pattern}{f' + {quant}' if quant else ''}", result, out_dir)


def _recovery_config(mode: str, tokens: int, data: str, device: str, **extra: Any) -> Any:
    from prunelab.recovery import RecoveryConfig

    return RecoveryConfig(mode=mode, tokens=tokens, data=data, device=device, **extra)


def _recovery_state(out_dir: Path) -> Path:
    """Checkpoints of a recovery in progress, beside the output: a killed run resumes from them."""
    return out_dir.parent / f".{out_dir.name}.recovery"


def _drop_recovery_state(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(_recovery_state(out_dir), ignore_errors=True)


def _print_recovery(rec: dict[str, Any]) -> None:
    for name, stage in rec["stages"].items():
        if name == "block":
            blocks = stage["blocks"]
            before = sum(b["loss_before"] for b in blocks) / max(1, len(blocks))
            after = sum(b["loss_after"] for b in blocks) / max(1, len(blocks))
            line = f"recovery block: {len(blocks)} blocks, mean held-out nmse {before:.4f} → {after:.4f}"
        else:
            curve = stage["loss_curve"]
            line = (f"recovery distill: {stage['tokens']:,} tokens, {stage['steps']} steps, loss "
                    f"{curve[0][1]:.4f} → {curve[-1][1]:.4f}")
        out.print(f"{line}, {stage['wall_s']:.0f} s", highlight=False)
    out.print(f"pruned weights still zero: {rec['zeros_after']:,} zeros (before {rec['zeros_before']:,})"
              f"{'; resumed ' + ', '.join(rec['resumed']) if rec['resumed'] else ''}", highlight=False)


@app.command()
def recover(
    pruned: str = typer.Argument(..., help="The pruned checkpoint (any HF checkpoint with zeros: they are the mask)."),
    teacher: str = typer.Option(..., "--teacher", help="The dense model it was pruned from (same architecture)."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    mode: str = typer.Option("block", "--mode", help="block, distill or block+distill."),
    tokens: int = typer.Option(100_000, "--tokens", help="Distillation tokens."),
    data: str = typer.Option("calib", "--data", help="Distillation text: calib, generated or a text file."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration text of the block stage (default: MRPC)."),
    calib_column: str | None = typer.Option(None, "--calib-column", help="Column of a .tsv/.jsonl calibration file."),
    nsamples: int = typer.Option(64, "--nsamples", help="Calibration windows of the block stage."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of window sampling and of the batch order."),
    quant: str | None = typer.Option(None, "--quant", help="Then quantize the recovered weights (int8 or int4, "
                                     "GPTQ on the fixed mask)."),
    group_size: int | None = typer.Option(None, "--group-size", help="Input columns per scale (int4: 128)."),
    fmt: str = typer.Option("hf", "--format", help="hf (save_pretrained, safetensors) or sparse (compressed)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 (autocast; weights stay fp32)."),
    checkpoint_every: float = typer.Option(300.0, "--checkpoint-every", help="Seconds between distillation "
                                           "checkpoints (a killed run resumes from the last one)."),
) -> None:
    """Recover a pruned checkpoint: train its kept weights against the dense teacher, the mask fixed."""
    import time as _time

    from prunelab.recovery.commands import recover_checkpoint

    t0 = _time.perf_counter()
    recovery = _recovery_config(mode, tokens, data, device, calib=calib, calib_column=calib_column,
                                nsamples=nsamples, seqlen=seqlen, seed=seed, precision=precision,
                                checkpoint_every_s=checkpoint_every)
    with _bar("recover") as progress:
        result = recover_checkpoint(pruned, teacher, recovery, out_dir, state_dir=_recovery_state(out_dir),
                                    quant=quant, group_size=group_size, format=fmt, progress=progress)
    _print_recovery(result.extra["recovery"])
    _drop_recovery_state(out_dir)
    out.print(f"{pruned}: recovered ({mode}) in {_time.perf_counter() - t0:.0f} s → {out_dir}", highlight=False)


def _bar(what: str) -> Any:
    """A transient rich progress bar; yields the `progress(message, done, total)` callback."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar() -> Any:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as p:
            task = p.add_task(what, total=None)
            yield lambda message, done, total: p.update(task, description=f"{what}: {message}", completed=done,
                                                        total=total)

    return bar()


def _print_prune_summary(model: str, what: str, result: Any, out_dir: Path) -> None:
    """Warnings, then one line: what is now zero (or, for structured pruning, what was removed)."""
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    shrunk = result.extra.get("structured")  # the method's own report, also in prune_report.json
    if shrunk:  # structured pruning removes weights instead of zeroing them
        out.print(f"{model}: structured {shrunk['target']} → parameters {shrunk['params_before']:,} → "
                  f"{shrunk['params_after']:,} (−{shrunk['params_removed']:,}) → {out_dir}",
                  highlight=False, soft_wrap=True)
        return
    rss = (result.peak_rss_bytes or 0) / 2**20
    out.print(
        f"{model}: {what} → {result.sparsity_prunable:.2%} of prunable weights zero "
        f"({result.sparsity_total:.2%} of all), {len(result.matrices)} matrices, "
        f"{result.timings.get('total', 0):.1f} s, peak RSS {rss:.0f} MiB → {out_dir}",
        highlight=False, soft_wrap=True,
    )


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model spec: zoo:<alias>, a local HF directory, a .gguf file or a hub id."),
    bench: list[str] = typer.Option([], "--bench", "-b", help="Benchmark (repeatable); default: the family's own."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Write the results JSON here."),
    seqlen: int | None = typer.Option(None, "--seqlen", help="Window / sequence length (default per bench)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Evaluate a prefix of this many tokens."),
    max_examples: int | None = typer.Option(None, "--max-examples", help="Cap on dev examples."),
    limit: int | None = typer.Option(None, "--limit", help="zeroshot: examples per task (first N; default all)."),
    train_limit: int | None = typer.Option(None, "--train-limit", help="Training rows for probe/finetune "
                                          "(default 2000, 0 = all)."),
    mode: str = typer.Option("probe", "--mode", help="GLUE mode: probe (frozen) or finetune (masks kept)."),
    reference: str | None = typer.Option(None, "--reference", help="Dense reference model for embed."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size"),
    data: str | None = typer.Option(None, "--data", help="Override the dataset file / directory."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Cap on fine-tuning optimizer steps."),
    offload: str = typer.Option("auto", "--offload", help="disk: stream the weights block by block (ppl runs "
                                "block-major); none: load the whole model; auto: disk when it exceeds --max-memory."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="Memory budget for the weights, e.g. 4GB."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Evaluate a model: perplexity, pseudo-perplexity, embedding fidelity, GLUE SST-2 / MRPC, zero-shot accuracy.

    `--bench zeroshot` runs lm-evaluation-harness on seven tasks offline; `--bench zeroshot:hellaswag,piqa` picks tasks.
    """
    from rich.table import Table

    from prunelab.errors import ConfigError
    from prunelab.evaluation import EvalOptions, run_benchmarks
    from prunelab.io import write_json

    if mode not in ("probe", "finetune"):
        raise ConfigError(f"unknown --mode '{mode}': use probe or finetune")
    options = EvalOptions(seqlen=seqlen, max_tokens=max_tokens, max_examples=max_examples, train_limit=train_limit,
                          mode=mode, seed=seed, batch_size=batch_size, data=data,  # type: ignore[arg-type]
                          finetune_max_steps=max_steps, limit=limit)

    def _progress(name: str, result: object) -> None:
        console.print(f"[green]done[/] {name}: {getattr(result, 'primary', '')} = {getattr(result, 'value', None)} "
                      f"({getattr(result, 'wall_time_s', 0.0):.1f} s)", highlight=False)

    from prunelab.evaluation.registry import get_bench
    from prunelab.models.offload import parse_bytes
    from prunelab.storage import load

    for name in bench:  # a typo fails before the model is read
        get_bench(name).with_arg(name, options)
    budget = parse_bytes(max_memory) if max_memory is not None else None
    lm = load(model, offload=offload, device=device, max_memory=budget)
    payload = run_benchmarks(lm, bench or None, options, reference=reference, progress=_progress)
    write_json(out_path, payload)
    table = Table("bench", "status", "metrics", "n", "seqlen", "wall s")
    for r in payload["results"]:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        table.add_row(r["bench"], r["status"], metrics, str(r["n_tokens"] or r["n_examples"] or "-"),
                      str(r["seqlen"] or "-"), f"{r['wall_time_s']:.1f}")
    out.print(table)
    out.print(f"results: {out_path}", highlight=False)


@app.command()
def bench(
    model: str = typer.Argument(..., help="Model spec or checkpoint directory (HF or prunelab sparse format)."),
    sparse: bool = typer.Option(True, "--sparse/--no-sparse", help="Also run the sparse runtime (dense vs sparse)."),
    prefill_tokens: int = typer.Option(512, "--prefill-tokens", help="Prompt length for prefill throughput."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Greedy decode steps per run (batch 1, KV cache)."),
    repeats: int = typer.Option(5, "--repeats", help="Interleaved repetitions; medians are reported."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="Measure resident memory in a fresh subprocess."),
    out_file: Path = typer.Option(..., "--out", help="JSON file for the results (written atomically)."),
) -> None:
    """Size on disk, resident memory, prefill tokens/s and decode ms/token: dense vs sparse runtime."""
    from rich.table import Table

    from prunelab.runtime.bench import run_bench

    res = run_bench(model, out_file, sparse=sparse, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                    repeats=repeats, measure_rss=rss)
    table = Table("measure", "dense", "sparse runtime", "unit", title=f"bench {model} ({res['threads']} threads)")
    sp = res["speed"]

    def fmt(v: object, spec: str = ",.1f") -> str:
        return "-" if v is None else format(v, spec)

    has_s = "sparse" in sp
    table.add_row("prefill", fmt(sp["dense"]["prefill_tokens_per_s"]),
                  fmt(sp["sparse"]["prefill_tokens_per_s"]) if has_s else "-", "tokens/s")
    table.add_row("decode", fmt(sp["dense"]["decode_ms_per_token"], ".2f"),
                  fmt(sp["sparse"]["decode_ms_per_token"], ".2f") if has_s else "-", "ms/token")
    size = res["size_on_disk"]
    table.add_row("size on disk", fmt(size["dense_safetensors_bytes"], ","),
                  fmt(size.get("sparse_format_bytes"), ","), "bytes")
    mem = res["memory"]
    table.add_row("RSS after load", fmt(mem.get("dense_rss_delta_bytes"), ","),
                  fmt(mem.get("sparse_rss_delta_bytes"), ","), "bytes")
    wb = mem.get("weights_bytes", {})
    table.add_row("weights held", fmt(wb.get("dense"), ","), fmt(wb.get("sparse"), ","), "bytes")
    out.print(table)
    for note in res.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"results: {out_file}", highlight=False)


@app.command("analyze")
def analyze_cmd(
    model: str = typer.Argument(..., help="Model spec: zoo:<alias>, a local HF directory, a .gguf file or a hub id."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (created atomically; replaced if it exists)."),
    include_all: bool = typer.Option(False, "--all", help="Also embeddings, norms, biases and heads."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="Scan threads (default: the usable CPUs, at most 4)."),
) -> None:
    """Weight-magnitude statistics and plots, streamed from safetensors (the model is not loaded)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    from rich.table import Table

    from prunelab.analysis import analyze

    with Progress(TextColumn("scanning weights"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("scan", total=None)
        stats = analyze(model, out_dir, include_all=include_all, workers=threads,
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    o, scan = stats["overall"], stats["scan"]
    table = Table("group", "params", "zeros", *[f"<{t}" for t in stats["thresholds"]], "median",
                  title=f"{stats['model']}: fraction of |w| below each threshold ({stats['family']}, "
                        f"{stats['scope']} scope)")
    rows = [("all", o)] + [(f" {t}", g) for t, g in stats["by_module_type"].items()]
    for name, g in rows:
        table.add_row(name, f"{g['params'] / 1e6:.2f}M", f"{g['zeros']:,}",
                      *[f"{g['fraction_below'][t]:.1%}" for t in stats["thresholds"]], f"{g['quantiles']['50']:.3g}")
    out.print(table)
    if stats["missing_prunable_matrices"]:
        console.print(f"[yellow]warning:[/] {len(stats['missing_prunable_matrices'])} prunable matrices of the "
                      "architecture have no tensor in the checkpoint (see missing_prunable_matrices in stats.json)",
                      highlight=False)
    out.print(f"scanned {scan['bytes'] / 1e9:.2f} GB of weights in {scan['seconds']:.2f} s "
              f"({scan['gb_per_s']} GB/s); outputs: {Path(out_dir).resolve()}", highlight=False)


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint directory or model spec (a decoder LM; pruned/quantized ok)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text (default: standard input if piped)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the chat template (interactive turns on a terminal)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling."),
) -> None:
    """Stream text from a model: prunelab's fused sparse engine when it can, transformers otherwise."""
    from prunelab.serve import generate as run_generate

    run_generate(model, prompt=prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed)


@app.command()
def serve(
    model: str = typer.Argument(..., help="Checkpoint directory or model spec (a decoder LM; pruned/quantized ok)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' (else 401)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Sequences decoded together per step."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Waiting requests beyond the batch (else 429)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds a request may take in all."),
    model_name: str | None = typer.Option(None, "--model-name", help="Model id clients send (default: MODEL)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Compute threads (default: all cores)."),
) -> None:
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    from prunelab.serve import serve as run_serve

    run_serve(model, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
              timeout_s=timeout, model_name=model_name, threads=threads)


def main() -> None:
    """Entry point: run the app, turning `PrunelabError` into a one-line message and exit 2."""
    try:
        app()
    except PrunelabError as exc:
        if _STATE["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished results are kept; rerun the same command to resume")
        sys.exit(130)


_ = Path  # re-exported for command modules that build paths


if __name__ == "__main__":  # `python -m prunelab.cli` (what tests spawn and kill)
    main()
