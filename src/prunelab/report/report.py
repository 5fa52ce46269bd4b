"""`prunelab report DIR`: DIR/report.md plus a self-contained DIR/report.html.

Everything comes from the results store (the rows of the last planned study) and the
`analyze` outputs under DIR/analysis. The HTML embeds every image as a base64 data URI so
the one file can be mailed or archived; the Markdown links the same PNGs in DIR/report_files.

Sections: summary table; per model the weight-distribution plots from `analyze`
(log-scale |w| histogram, CDF, CDF per block), metric vs sparsity per benchmark (one line per
method, dense as a dashed reference, log y for perplexities), size on disk vs sparsity (dense
vs sparse format vs information bound), decode speed vs sparsity; failed cells; the preset's
data sizes and why; the exact configuration; library versions.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.study.store import Row, Store

ANALYSIS_PLOTS = [
    ("hist_abs_log.png", "|w| histogram (log-scale bins)"),
    ("cdf_abs.png", "CDF of |w|"),
    ("cdf_by_block.png", "CDF of |w| per block"),
]
LOG_Y_BENCHES = {"ppl", "seq2seq-ppl", "pppl"}


@dataclass
class Figure:
    name: str  # file name in report_files/
    caption: str
    png: bytes | None = None
    path: Path | None = None  # an existing PNG (analysis plots)

    def data(self) -> bytes:
        return self.png if self.png is not None else Path(self.path).read_bytes()  # type: ignore[arg-type]


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Extracting numbers from rows
# ---------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        v = _num(d.get(key))
        if v is not None:
            return v
    return None


def size_numbers(row: Row) -> dict[str, float | None]:
    """Bytes on disk of a size cell: dense HF checkpoint, sparse format, entropy and bitmask bounds."""
    s = row.sizes or {}
    return {
        "dense": _first(s, ("dense_bytes", "checkpoint_bytes")),
        "sparse": _first(s, ("sparse_bytes", "sparse_dir_bytes")),
        "bound": _first(s, ("entropy_bound_bytes",)),
        "bitmask": _first(s, ("bitmask_bound_bytes",)),
    }


def speed_numbers(row: Row) -> dict[str, Any]:
    """Dense and sparse speed of a speed cell (from `runtime.bench_model`'s `speed` section).

    Decoders: decode latency in ms/token (lower is better). Encoders do not decode: prefill
    throughput in tokens/s (higher is better) instead.
    """
    speed = (row.metrics or {}).get("speed") or {}
    out: dict[str, Any] = {"dense": None, "sparse": None, "metric": "decode_ms_per_token"}
    dense, sparse = speed.get("dense") or {}, speed.get("sparse") or {}
    if _num(dense.get("decode_ms_per_token")) is None:
        out["metric"] = "prefill_tokens_per_s"
    out["dense"] = _num(dense.get(out["metric"]))
    out["sparse"] = _num(sparse.get(out["metric"]))
    return out


def _bench_value(row: Row) -> float | None:
    m = row.metrics or {}
    if m.get("status") == "not_applicable":
        return None
    return _num(m.get("value"))


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


# ---------------------------------------------------------------------------------------------
# Building sections
# ---------------------------------------------------------------------------------------------


def _model_sections(rows: list[Row], out_dir: Path, models: list[str]) -> list[Section]:
    from prunelab.report import figures

    sections: list[Section] = []
    for mi, model in enumerate(models):
        mrows = [r for r in rows if r.model == model]
        sec = Section(f"{model}")
        tag = f"m{mi}"
        # Weight distribution from analyze.
        arow = next((r for r in mrows if r.kind == "analyze"), None)
        if arow is not None and arow.status == "done":
            files = (arow.metrics or {}).get("files", {})
            for fname, caption in ANALYSIS_PLOTS:
                rel = files.get(fname)
                if rel and (out_dir / rel).is_file():
                    sec.figures.append(Figure(f"{tag}-{fname}", f"{model}: {caption}", path=out_dir / rel))
                else:
                    sec.notes.append(f"analysis plot {fname} missing")
        elif arow is not None:
            sec.notes.append(f"analyze failed: {arow.error}")
        # Metric vs sparsity per benchmark.
        for bench in sorted({r.bench for r in mrows if r.kind == "bench"}):
            brows = [r for r in mrows if r.kind == "bench" and r.bench == bench and r.status == "done"]
            dense_row = next((r for r in brows if r.method == "dense"), None)
            dense = _bench_value(dense_row) if dense_row else None
            series: dict[str, list[tuple[float, float]]] = {}
            primary, hib = None, None
            for r in brows:
                primary = primary or (r.metrics or {}).get("primary")
                hib = (r.metrics or {}).get("higher_is_better", hib)
                v = _bench_value(r)
                if r.method != "dense" and v is not None:
                    series.setdefault(r.method_label, []).append((r.sparsity, v))
            na = [r for r in brows if (r.metrics or {}).get("status") == "not_applicable"]
            if na:
                sec.notes.append(f"{bench}: not applicable ({(na[0].metrics or {}).get('note', '')})")
            failed = [r for r in mrows if r.kind == "bench" and r.bench == bench and r.status != "done"]
            if failed:
                sec.notes.append(f"{bench}: {len(failed)} cell(s) not done, e.g. {failed[0].error}")
            direction = "" if hib is None else (" (higher is better)" if hib else " (lower is better)")
            ylabel = f"{primary or 'value'}{direction}"
            log_y = bench in LOG_Y_BENCHES or "ppl" in str(primary) or "perplexity" in str(primary)
            png = figures.metric_vs_sparsity(series, title=f"{_short(model)}: {bench} vs sparsity", ylabel=ylabel,
                                             dense=dense, log_y=log_y)
            if png:
                sec.figures.append(Figure(f"{tag}-bench-{bench}.png",
                                          f"{model}: {bench} {primary or ''} vs sparsity, one line per method"
                                          + (" (log y)" if log_y else ""), png=png))
        # Size on disk vs sparsity.
        srows = [r for r in mrows if r.kind == "size" and r.status == "done"]
        if srows:
            series = {}
            dense_bytes = None
            for r in srows:
                n = size_numbers(r)
                dense_bytes = dense_bytes or n["dense"]
                if n["sparse"] is not None:
                    series.setdefault(f"sparse format ({r.method_label})", []).append((r.sparsity, n["sparse"]))
                for key, name in (("bound", "entropy bound"), ("bitmask", "bitmask bound")):
                    if n[key] is not None:
                        series.setdefault(name, []).append((r.sparsity, n[key]))
            for name in ("entropy bound", "bitmask bound"):  # depends on sparsity only: one value per x
                if name in series:
                    best: dict[float, float] = {}
                    for x, y in series[name]:
                        best[x] = min(y, best.get(x, y))
                    series[name] = sorted(best.items())
            png = figures.size_vs_sparsity(series, title=f"{_short(model)}: size on disk vs sparsity",
                                           dense_bytes=dense_bytes)
            if png:
                sec.figures.append(Figure(f"{tag}-size.png", f"{model}: size on disk (dense vs sparse format vs "
                                          "bound) vs sparsity", png=png))
        elif any(r.kind == "size" for r in mrows):
            bad = next(r for r in mrows if r.kind == "size")
            sec.notes.append(f"size: no finished cell ({bad.error})")
        # Decode speed vs sparsity.
        prow = [r for r in mrows if r.kind == "speed" and r.status == "done"]
        if prow:
            series = {}
            dense_vals = []
            metric = "decode_ms_per_token"
            for r in prow:
                n = speed_numbers(r)
                metric = n["metric"]
                if n["sparse"] is not None:
                    series.setdefault(f"sparse runtime ({r.method_label})", []).append((r.sparsity, n["sparse"]))
                if n["dense"] is not None:  # timed interleaved with the sparse run: same machine load
                    series.setdefault("dense (timed alongside)", []).append((r.sparsity, n["dense"]))
                    dense_vals.append(n["dense"])
            dense = None  # the per-cell dense line is the reference; a global median would mix load levels
            if metric == "decode_ms_per_token":
                what, ylabel = "decode latency", "decode latency (ms/token, median; lower is better)"
            else:
                what, ylabel = "prefill throughput", "prefill throughput (tokens/s, median; higher is better)"
            png = figures.speed_vs_sparsity(series, title=f"{_short(model)}: {what} vs sparsity", ylabel=ylabel,
                                            dense=dense)
            if png:
                extra = "" if metric == "decode_ms_per_token" else " (an encoder does not decode)"
                sec.figures.append(Figure(f"{tag}-speed.png", f"{model}: {what} vs sparsity{extra} "
                                          "(sparse runtime vs the dense model timed in the same cell)", png=png))
            else:
                sec.notes.append("speed: no timing in the speed results")
        elif any(r.kind == "speed" for r in mrows):
            bad = next(r for r in mrows if r.kind == "speed")
            sec.notes.append(f"speed: no finished cell ({bad.error})")
        elif arow is not None and (arow.metrics or {}).get("family") == "encoder-decoder" and srows:
            sec.notes.append("speed: not measured — the runtime benchmark times text-token prefill/decode, "
                             "and this is a speech model")
        sections.append(sec)
    return sections


def summary_table(rows: list[Row], models: list[str]) -> tuple[list[str], list[list[str]]]:
    """One line per (model, method, sparsity) point: achieved sparsity, benchmark values, size, speed."""
    benches_by_model = {m: sorted({r.bench for r in rows if r.model == m and r.kind == "bench"}) for m in models}
    all_benches = sorted({b for bs in benches_by_model.values() for b in bs})
    header = ["model", "method", "sparsity", "achieved", *all_benches, "size MB (sparse)", "size ratio",
              "speed (sparse / dense)"]
    points: dict[tuple[str, str, float], dict[str, Any]] = {}
    for r in rows:
        if r.kind == "analyze":
            continue
        key = (r.model, r.method_label if r.method != "dense" else "dense", r.sparsity)
        p = points.setdefault(key, {})
        if r.status != "done":
            if r.kind == "bench":
                p[r.bench] = r.status
            continue
        if r.kind == "prune":
            p["achieved"] = _num((r.metrics or {}).get("achieved_sparsity_prunable"))
        elif r.kind == "bench":
            v = _bench_value(r)
            p[r.bench] = v if v is not None else "n/a"
        elif r.kind == "size":
            n = size_numbers(r)
            if n["sparse"] is not None:
                p["size"] = n["sparse"] / 1e6
                if n["dense"]:
                    p["ratio"] = n["sparse"] / n["dense"]
        elif r.kind == "speed":
            n = speed_numbers(r)
            if n["sparse"] is not None and n["dense"] is not None:
                unit = "ms/tok" if n["metric"] == "decode_ms_per_token" else "tok/s prefill"
                p["speed"] = f"{n['sparse']:.3g} / {n['dense']:.3g} {unit}"
    order = {m: i for i, m in enumerate(models)}
    body = []
    for (model, method, sparsity), p in sorted(points.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                               kv[0][1] != "dense", kv[0][1],
                                                                               kv[0][2])):
        line = [_short(model), method, f"{sparsity:g}", _fmt(p.get("achieved"))]
        line += [_fmt(p.get(b)) if b in benches_by_model.get(model, []) else "" for b in all_benches]
        line += [_fmt(p.get("size")), _fmt(p.get("ratio"), 3), p.get("speed", "–")]
        body.append(line)
    return header, body


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{rows}</tbody></table>"


def build_report(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write DIR/report.md, DIR/report.html and DIR/report_files/*.png; return their paths."""
    import yaml

    from prunelab.io import atomic_dir, atomic_file
    from prunelab.study.config import PRESET_NOTES

    out = Path(out_dir)
    with Store(out, create=False) as store:
        rows = store.plan_rows()
        config = store.get_meta("config", {}) or {}
        meta = {k: store.get_meta(k) for k in ("executor", "started_at", "finished_at")}
    models = list(config.get("models") or dict.fromkeys(r.model for r in rows))
    sections = _model_sections(rows, out, models)
    header, body = summary_table(rows, models)
    versions = next((r.versions for r in rows if r.versions), {})
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("done", "failed", "running")}
    compute = sum(r.wall_s or 0.0 for r in rows)
    cpu = sum(r.cpu_s or 0.0 for r in rows)
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + (r.wall_s or 0.0)
    failed = [r for r in rows if r.status != "done"]
    preset = config.get("preset", "default")
    config_yaml = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    intro = [
        f"Study directory: `{out}` — generated {generated}.",
        f"Cells: {len(rows)} planned, {counts['done']} done, {counts['failed']} failed, "
        f"{counts['running']} interrupted; executor `{meta.get('executor')}`, preset `{preset}`.",
        f"Compute time summed over cells: {compute / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(by_kind.items())) + f"); CPU time {cpu / 60:.1f} min.",
        "Sparsity on the x axes is the requested fraction of prunable weights (attention and MLP matrices "
        "inside transformer blocks) set to zero; the summary table gives the achieved value.",
    ]

    files_dir = out / "report_files"
    with atomic_dir(files_dir) as tmp:
        for sec in sections:
            for fig in sec.figures:
                (tmp / fig.name).write_bytes(fig.data())

    # -- Markdown ------------------------------------------------------------------------
    md = ["# prunelab study report", "", *[f"{line}  " for line in intro], ""]
    md += ["## Summary", "", _md_table(header, body), ""]
    for sec in sections:
        md += [f"## {sec.title}", ""]
        for fig in sec.figures:
            md += [f"![{fig.caption}](report_files/{fig.name})", "", f"*{fig.caption}*", ""]
        md += [f"- {n}" for n in sec.notes] + ([""] if sec.notes else [])
    if failed:
        md += ["## Cells not done", "", _md_table(["cell", "status", "error"],
                                                   [[r.cell.label, r.status, str(r.error)] for r in failed]), ""]
    md += ["## Data sizes (preset)", "", PRESET_NOTES.get(preset, ""), ""]
    md += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    md += ["## Library versions", "", _md_table(["package", "version"], [[k, str(v)] for k, v in versions.items()]),
           ""]
    with atomic_file(out / "report.md") as fh:
        fh.write("\n".join(md))

    # -- HTML ----------------------------------------------------------------------------
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>prunelab study report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
             "figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:48%}figure img{max-width:100%}"
             "figcaption{font-size:12px;color:#555}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
             ".note{color:#a33;font-size:13px}</style></head><body>",
             "<h1>prunelab study report</h1>", *[f"<p>{html.escape(line)}</p>" for line in intro],
             "<h2>Summary</h2>", _html_table(header, body)]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        for fig in sec.figures:
            b64 = base64.b64encode(fig.data()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(fig.caption, quote=True)}' "
                         f"src='data:image/png;base64,{b64}'><figcaption>{html.escape(fig.caption)}</figcaption>"
                         "</figure>")
        for note in sec.notes:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if failed:
        parts += ["<h2>Cells not done</h2>", _html_table(["cell", "status", "error"],
                                                         [[r.cell.label, r.status, str(r.error)] for r in failed])]
    parts += ["<h2>Data sizes (preset)</h2>", f"<p>{html.escape(PRESET_NOTES.get(preset, ''))}</p>",
              "<h2>Configuration</h2>", f"<pre>{html.escape(config_yaml)}</pre>",
              "<h2>Library versions</h2>", _html_table(["package", "version"],
                                                       [[k, str(v)] for k, v in versions.items()]),
              f"<!-- rows: {html.escape(json.dumps(counts))} -->", "</body></html>"]
    with atomic_file(out / "report.html") as fh:
        fh.write("\n".join(parts))
    n_figs = sum(len(s.figures) for s in sections)
    return {"markdown": out / "report.md", "html": out / "report.html", "files": files_dir,
            "figures": n_figs}  # type: ignore[dict-item]
