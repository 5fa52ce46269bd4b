"""`prunelab report DIR`: DIR/report.md plus a self-contained DIR/report.html.

Everything comes from the results store (the rows of the last planned study) and the
`analyze` outputs under DIR/analysis. The HTML embeds every image as a base64 data URI so
the one file can be mailed or archived; the Markdown links the same PNGs in DIR/report_files.

Sections: summary table; the methods (from the method registry); per model the weight-distribution plots from `analyze`
(log-scale |w| histogram, CDF, CDF per block), metric vs sparsity per benchmark (one line per
method, dense as a dashed reference, log y for perplexities; zero-shot accuracy as one panel per task
and one for the mean, `report.zeroshot`), size on disk vs sparsity (dense
vs sparse format vs information bound), decode speed vs sparsity; failed cells; the preset's
data sizes and why; the exact configuration; library versions.

The report is built as a list of parts (headings, text, tables, figures, notes, code) that
`report.document` renders twice, as Markdown and as HTML, so both files always say the same thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError
from prunelab.report.answer import bench_curves, headline_parts
from prunelab.report.blocks import block_figures
from prunelab.report.document import Code, Figure, Heading, Notes, Part, Table, Text, render_html, render_markdown
from prunelab.report.extract import (
    accuracy_baselines,
    fmt,
    fmt_measure,
    fmt_speed,
    measure_of,
    short,
    size_numbers,
    speed_unit,
)
from prunelab.report.figures import metric_vs_sparsity, size_vs_sparsity, speed_vs_sparsity
from prunelab.report.intervals import spread
from prunelab.report.tradeoffs import LOG_Y_BENCHES, tradeoff_figures
from prunelab.report.zeroshot import is_zeroshot, zeroshot_figure
from prunelab.study.cells import DENSE
from prunelab.study.store import Row, Store

__all__ = ["build_report", "size_numbers", "summary_table"]

ANALYSIS_PLOTS = [
    ("hist_abs_log.png", "|w| histogram (log-scale bins)"),
    ("cdf_abs.png", "CDF of |w|"),
    ("cdf_by_block.png", "CDF of |w| per block"),
]
BOUNDS = (("bound", "entropy bound"), ("bitmask", "bitmask bound"))
SUMMARY_NOTE = (
    "Benchmark values with their 95 % interval in brackets: Wilson score interval for accuracies (from the number "
    "of correct dev examples), percentile bootstrap (2000 resamples, seed 0) over the scored units for "
    "perplexities (128-token blocks of the windows, sentences, or examples), WER (clips) and cosine fidelity "
    "(sentences); lm-eval's standard errors for zero-shot means. Speed: median, with min–max over the timed "
    "repeats in parentheses."
)


@dataclass
class Section:
    """One model's part of the report: its figures, then notes on what is missing or failed."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure | None, notes: list[str]) -> None:
        if figure is not None:
            self.figures.append(figure)
        self.notes += notes

    def parts(self) -> list[Part]:
        return [Heading(self.title), *self.figures, Notes(self.notes)]


# ---------------------------------------------------------------------------------------------
# Per-model sections: one function per figure kind, each returning (figure or None, notes)
# ---------------------------------------------------------------------------------------------


def _analysis_figures(model: str, tag: str, mrows: list[Row], out_dir: Path) -> tuple[list[Figure], list[str]]:
    """The weight-distribution plots `analyze` wrote for this model."""
    arow = next((r for r in mrows if r.kind == "analyze"), None)
    if arow is None:
        return [], []
    if arow.status != "done":
        return [], [f"analyze failed: {arow.error}"]
    figures, notes = [], []
    files = arow.analysis_files
    for fname, caption in ANALYSIS_PLOTS:
        rel = files.get(fname)
        if rel and (out_dir / rel).is_file():
            figures.append(Figure(f"{tag}-{fname}", f"{model}: {caption}", path=out_dir / rel))
        else:
            notes.append(f"analysis plot {fname} missing")
    return figures, notes


def _bench_figure(model: str, tag: str, bench: str, mrows: list[Row]) -> tuple[Figure | None, list[str]]:
    """Benchmark value vs sparsity, one line per method with its 95 % band, dense as a dashed reference.

    Accuracy figures also draw the majority-class and chance levels of the dev examples used.
    """
    rows = [r for r in mrows if r.kind == "bench" and r.bench == bench]
    outcomes = [(r, r.bench_outcome()) for r in rows if r.status == "done"]
    curves = bench_curves(rows).get(bench)
    series: dict[str, list[tuple[float, float]]] = {}
    bands: dict[str, list[tuple[float, float, float]]] = {}
    for method, points in (curves.methods.items() if curves else []):
        for x, m in points.items():
            if m is not None:
                series.setdefault(method, []).append((x, m.value))
                if m.interval is not None:
                    bands.setdefault(method, []).append((x, m.interval.low, m.interval.high))
    dense = curves.dense if curves else None
    primary = next((o.primary for _, o in outcomes if o.primary), None)
    hib = curves.higher_is_better if curves else None
    baselines = accuracy_baselines(rows)
    notes = []
    na = [o for _, o in outcomes if not o.applicable]
    if na:
        notes.append(f"{bench}: not applicable ({na[0].note})")
    failed = [r for r in rows if r.status != "done"]
    if failed:
        notes.append(f"{bench}: {len(failed)} cell(s) not done, e.g. {failed[0].error}")
    direction = "" if hib is None else (" (higher is better)" if hib else " (lower is better)")
    log_y = bench in LOG_Y_BENCHES or "ppl" in str(primary) or "perplexity" in str(primary)
    png = metric_vs_sparsity(series, title=f"{short(model)}: {bench} vs sparsity",
                             ylabel=f"{primary or 'value'}{direction}", dense=dense.value if dense else None,
                             log_y=log_y, bands=bands,
                             dense_band=(dense.low, dense.high) if dense and dense.interval else None,
                             baselines=baselines)
    how = next((m.interval.method for m in [dense, *(m for pts in (curves.methods.values() if curves else [])
                                                      for m in pts.values())] if m and m.interval), None)
    caption = (f"{model}: {bench} {primary or ''} vs sparsity, one line per method" + (" (log y)" if log_y else "")
               + (f"; shaded: 95 % intervals, {_generic(how)}" if how else "; no interval recorded")
               + ("; dotted: " + ", ".join(sorted(baselines)) if baselines else ""))
    return (Figure(f"{tag}-bench-{bench}.png", caption, png=png) if png else None), notes


def _generic(method: str) -> str:
    """An interval's method without its counts ("Wilson 95 %", "bootstrap 95 % over sentences")."""
    return method.split(" (")[0]


def _size_series(rows: list[Row]) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """Sparse-format bytes per method, and the bounds (which depend on sparsity only: lowest per x)."""
    series: dict[str, list[tuple[float, float]]] = {}
    dense_bytes = None
    for r in rows:
        n = size_numbers(r)
        dense_bytes = dense_bytes or n["dense"]
        if n["sparse"] is not None:
            series.setdefault(f"sparse format ({r.method_label})", []).append((r.sparsity, n["sparse"]))
        for key, name in BOUNDS:
            if n[key] is not None:
                series.setdefault(name, []).append((r.sparsity, n[key]))
    for _, name in BOUNDS:
        if name in series:
            best: dict[float, float] = {}
            for x, y in series[name]:
                best[x] = min(y, best.get(x, y))
            series[name] = sorted(best.items())
    return series, dense_bytes


def _size_figure(model: str, tag: str, mrows: list[Row]) -> tuple[Figure | None, list[str]]:
    """Size on disk vs sparsity: dense checkpoint vs sparse format vs information bounds."""
    rows = [r for r in mrows if r.kind == "size"]
    done = [r for r in rows if r.status == "done"]
    if not done:
        return None, ([f"size: no finished cell ({rows[0].error})"] if rows else [])
    series, dense_bytes = _size_series(done)
    png = size_vs_sparsity(series, title=f"{short(model)}: size on disk vs sparsity", dense_bytes=dense_bytes)
    caption = f"{model}: size on disk (dense vs sparse format vs bound) vs sparsity"
    return (Figure(f"{tag}-size.png", caption, png=png) if png else None), []


def _speed_figure(model: str, tag: str, mrows: list[Row]) -> tuple[Figure | None, list[str]]:
    """Sparse-runtime speed vs sparsity next to the dense model timed in the same cell."""
    rows = [r for r in mrows if r.kind == "speed"]
    done = [r for r in rows if r.status == "done"]
    if not done:
        return None, ([f"speed: no finished cell ({rows[0].error})"] if rows else _speed_not_measured(mrows))
    series: dict[str, list[tuple[float, float]]] = {}
    bands: dict[str, list[tuple[float, float, float]]] = {}
    is_decode = True
    for r in done:
        o = r.speed_outcome()
        is_decode = o.is_decode
        for label, value, runs in ((f"sparse runtime ({r.method_label})", o.sparse, o.sparse_runs),
                                   ("dense (timed alongside)", o.dense, o.dense_runs)):
            if value is None:  # dense is timed interleaved with the sparse run: same machine load
                continue
            series.setdefault(label, []).append((r.sparsity, value))
            rng = spread(runs)
            if rng:
                bands.setdefault(label, []).append((r.sparsity, *rng))
    if is_decode:
        what, ylabel, extra = "decode latency", "decode latency (ms/token, median; lower is better)", ""
    else:
        what, ylabel = "prefill throughput", "prefill throughput (tokens/s, median; higher is better)"
        extra = " (an encoder does not decode)"
    # No global dense line: the per-cell dense series is the reference (a median would mix load levels).
    png = speed_vs_sparsity(series, title=f"{short(model)}: {what} vs sparsity", ylabel=ylabel, dense=None,
                            bands=bands)
    if not png:
        return None, ["speed: no timing in the speed results"]
    caption = (f"{model}: {what} vs sparsity{extra} (sparse runtime vs the dense model timed in the same cell)"
               + ("; shaded: min–max over the timed repeats" if bands else ""))
    return Figure(f"{tag}-speed.png", caption, png=png), []


def _speed_not_measured(mrows: list[Row]) -> list[str]:
    """Why a speech model that has size cells has no speed figure."""
    arow = next((r for r in mrows if r.kind == "analyze"), None)
    sized = any(r.kind == "size" and r.status == "done" for r in mrows)
    if arow is not None and arow.model_family == "encoder-decoder" and sized:
        return ["speed: not measured — the runtime benchmark times text-token prefill/decode, "
                "and this is a speech model"]
    return []


def _model_section(model: str, tag: str, rows: list[Row], out_dir: Path) -> Section:
    mrows = [r for r in rows if r.model == model]
    sec = Section(model)
    figures, notes = _analysis_figures(model, tag, mrows, out_dir)
    sec.figures += figures
    sec.notes += notes
    for bench in sorted({r.bench for r in mrows if r.kind == "bench"}):
        figure, notes = _bench_figure(model, tag, bench, mrows)
        if is_zeroshot(bench):  # every task and the mean in one figure, in place of the mean alone
            figure = zeroshot_figure(model, tag, mrows) or figure
        sec.add(figure, notes)
    sec.add(*_size_figure(model, tag, mrows))
    sec.add(*_speed_figure(model, tag, mrows))
    for figures, notes in (tradeoff_figures(model, tag, mrows), block_figures(model, tag, mrows)):
        sec.figures += figures
        sec.notes += notes
    return sec


def _model_sections(rows: list[Row], out_dir: Path, models: list[str]) -> list[Section]:
    return [_model_section(model, f"m{mi}", rows, out_dir) for mi, model in enumerate(models)]


# ---------------------------------------------------------------------------------------------
# The summary table
# ---------------------------------------------------------------------------------------------


@dataclass
class _Point:
    """One line of the summary table: a (model, method, sparsity) point and what its cells measured."""

    achieved: float | None = None
    benches: dict[str, float | str] = field(default_factory=dict)  # value, "n/a", or the status of a cell not done
    size_mb: float | None = None
    ratio: float | None = None
    speed: str = "–"

    def add(self, r: Row) -> None:
        """Put what row `r` measured into this line."""
        if r.status != "done":
            if r.kind == "bench":
                self.benches[r.bench] = r.status
            return
        if r.kind == "prune":
            self.achieved = r.achieved_sparsity
        elif r.kind == "bench":
            m = measure_of(r)
            self.benches[r.bench] = fmt_measure(m) if m is not None else "n/a"
        elif r.kind == "size":
            n = size_numbers(r)
            if n["sparse"] is not None:
                self.size_mb = n["sparse"] / 1e6
                if n["dense"]:
                    self.ratio = n["sparse"] / n["dense"]
        elif r.kind == "speed":
            o = r.speed_outcome()
            if o.sparse is not None and o.dense is not None:
                unit = speed_unit(o)
                self.speed = f"{fmt_speed(o.sparse, o.sparse_runs, '')} / {fmt_speed(o.dense, o.dense_runs, unit)}"


def summary_table(rows: list[Row], models: list[str]) -> tuple[list[str], list[list[str]]]:
    """One line per (model, method, sparsity) point: achieved sparsity, benchmark values, size, speed."""
    benches_by_model = {m: sorted({r.bench for r in rows if r.model == m and r.kind == "bench"}) for m in models}
    all_benches = sorted({b for bs in benches_by_model.values() for b in bs})
    header = ["model", "method", "sparsity", "achieved", *all_benches, "size MB (sparse)", "size ratio",
              "speed (sparse / dense)"]
    points: dict[tuple[str, str, float], _Point] = {}
    for r in rows:
        if r.kind != "analyze":
            points.setdefault((r.model, r.method_label if r.method != DENSE else DENSE, r.sparsity), _Point()).add(r)
    order = {m: i for i, m in enumerate(models)}
    body = []
    for (model, method, sparsity), p in sorted(points.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                               kv[0][1] != "dense", kv[0][1],
                                                                               kv[0][2])):
        line = [short(model), method, f"{sparsity:g}", fmt(p.achieved)]
        line += [fmt(p.benches.get(b)) if b in benches_by_model.get(model, []) else "" for b in all_benches]
        line += [fmt(p.size_mb), fmt(p.ratio, 3), p.speed]
        body.append(line)
    return header, body


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """What the report reads from the store: the planned rows, the configuration, run facts."""

    out: Path
    rows: list[Row]
    config: dict[str, Any]
    meta: dict[str, Any]

    @classmethod
    def read(cls, out: Path) -> StudyData:
        with Store(out, create=False) as store:
            rows = store.plan_rows()
            config = store.get_meta("config", {}) or {}
            meta = {k: store.get_meta(k) for k in ("executor", "started_at", "finished_at")}
        return cls(out, rows, config, meta)

    @property
    def models(self) -> list[str]:
        return list(self.config.get("models") or dict.fromkeys(r.model for r in self.rows))

    @property
    def preset(self) -> str:
        return self.config.get("preset", "default")

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.rows if r.status == s) for s in ("done", "failed", "running")}


def _intro(study: StudyData) -> list[str]:
    counts = study.counts
    by_kind: dict[str, float] = {}
    for r in study.rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + (r.wall_s or 0.0)
    compute = sum(r.wall_s or 0.0 for r in study.rows)
    cpu = sum(r.cpu_s or 0.0 for r in study.rows)
    return [
        f"Study directory: `{study.out}` — generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        f"Cells: {len(study.rows)} planned, {counts['done']} done, {counts['failed']} failed, "
        f"{counts['running']} interrupted; executor `{study.meta.get('executor')}`, preset `{study.preset}`.",
        f"Compute time summed over cells: {compute / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(by_kind.items())) + f"); CPU time {cpu / 60:.1f} min.",
        "Sparsity on the x axes is the requested fraction of prunable weights (attention and MLP matrices "
        "inside transformer blocks) set to zero; the summary table gives the achieved value.",
    ]


def _method_description(name: str) -> str:
    """The registry's one line on a method, or why there is none (an old name, a plug-in not importable here)."""
    from prunelab.pruning.registry import get_method_spec

    try:
        return get_method_spec(name).description or "–"
    except ConfigError:
        return "not in this installation's method registry"


def _methods_legend(study: StudyData) -> list[Part]:
    """What each pruning method in the results does, in the method registry's own words."""
    from prunelab.pruning.registry import load_plugins

    labels: dict[str, set[str]] = {}
    for r in study.rows:
        if r.method != DENSE:
            labels.setdefault(r.method, set()).add(r.method_label)
    if not labels:
        return []
    with contextlib.suppress(ConfigError):  # plug-in methods describe themselves once imported
        load_plugins(study.config.get("plugins") or [])
    body = [[name, ", ".join(sorted(labels[name])), _method_description(name)] for name in sorted(labels)]
    return [Heading("Methods"), Table(["method", "in this study as", "description"], body)]


def _appendix(study: StudyData) -> list[Part]:
    """Failed cells, the preset's data sizes, the exact configuration and the library versions."""
    import yaml

    from prunelab.study.config import PRESET_NOTES

    parts: list[Part] = []
    failed = [r for r in study.rows if r.status != "done"]
    if failed:
        parts += [Heading("Cells not done"),
                  Table(["cell", "status", "error"], [[r.cell.label, r.status, str(r.error)] for r in failed])]
    versions = next((r.versions for r in study.rows if r.versions), {})
    config_yaml = yaml.safe_dump(study.config, sort_keys=False, default_flow_style=None, width=110)
    return parts + [
        Heading("Data sizes (preset)"), Text([PRESET_NOTES.get(study.preset, "")]),
        Heading("Configuration"), Code(config_yaml, "yaml"),
        Heading("Library versions"), Table(["package", "version"], [[k, str(v)] for k, v in versions.items()]),
    ]


def _document(study: StudyData, sections: list[Section]) -> list[Part]:
    parts: list[Part] = [Text(_intro(study), hard_breaks=True), *headline_parts(study.rows, study.models),
                         Heading("Summary"), Text([SUMMARY_NOTE]), Table(*summary_table(study.rows, study.models)),
                         *_methods_legend(study)]
    for sec in sections:
        parts += sec.parts()
    return parts + _appendix(study)


def build_report(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write DIR/report.md, DIR/report.html and DIR/report_files/*.png; return their paths."""
    from prunelab.io import atomic_dir, atomic_file

    out = Path(out_dir)
    study = StudyData.read(out)
    sections = _model_sections(study.rows, out, study.models)
    parts = _document(study, sections)
    files_dir = out / "report_files"
    with atomic_dir(files_dir) as tmp:
        for sec in sections:
            for fig in sec.figures:
                (tmp / fig.name).write_bytes(fig.data())
    title = "prunelab study report"
    with atomic_file(out / "report.md") as fh:
        fh.write(render_markdown(title, parts))
    with atomic_file(out / "report.html") as fh:
        fh.write(render_html(title, parts, comment=f"rows: {json.dumps(study.counts)}"))
    n_figs = sum(len(s.figures) for s in sections)
    return {"markdown": out / "report.md", "html": out / "report.html", "files": files_dir,
            "figures": n_figs}  # type: ignore[dict-item]
