"""Report: every figure is produced from the store, embedded, and renders in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prunelab.report import build_report
from prunelab.report.report import size_numbers
from prunelab.study import Cell, CellResult, Sizes, Store

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def synthetic_study(out: Path) -> list[Cell]:
    """A store with the rows a 2-model study writes, without running any model."""
    models = {"zoo:dec": "ppl", "zoo:enc": "sst2"}
    cells: list[Cell] = []
    with Store(out) as store:
        for model, bench in models.items():
            a = Cell("analyze", model)
            files = {}
            for name in ("hist_abs_log.png", "cdf_abs.png", "cdf_by_block.png"):
                rel = f"analysis/{model.replace(':', '_')}/{name}"
                _fake_png(out / rel, name)
                files[name] = rel
            cells.append(a)
            store.mark_running(a)
            store.finish(a, CellResult("done", metrics={"files": files}, wall_s=1.0))
            dense = Cell("bench", model, bench=bench)
            cells.append(dense)
            store.mark_running(dense)
            store.finish(dense, CellResult("done", metrics={"value": 20.0 if bench == "ppl" else 0.9,
                                                            "primary": "ppl" if bench == "ppl" else "accuracy",
                                                            "higher_is_better": bench != "ppl", "status": "ok"}))
            for method in ("magnitude", "wanda"):
                for s in (0.5, 0.9):
                    prune = Cell("prune", model, method=method, sparsity=s)
                    b = Cell("bench", model, method=method, sparsity=s, bench=bench)
                    size = Cell("size", model, method=method, sparsity=s)
                    speed = Cell("speed", model, method=method, sparsity=s)
                    value = (20 * (1 + 10 * s) if method == "magnitude" else 20 * (1 + 2 * s)) if bench == "ppl" \
                        else 0.9 - 0.3 * s
                    results = {
                        prune: {"metrics": {"achieved_sparsity_prunable": s}},
                        b: {"metrics": {"value": value, "primary": "ppl" if bench == "ppl" else "accuracy",
                                        "higher_is_better": bench != "ppl", "status": "ok"}},
                        size: {"sizes": Sizes(dense_bytes=1e8, sparse_bytes=1e8 * (1.1 - s),
                                              entropy_bound_bytes=1e8 * (1 - s) * 0.9,
                                              bitmask_bound_bytes=1e8 * (1 - s) + 3e6)},
                        speed: {"metrics": {"speed": {"dense": {"decode_ms_per_token": 10.0},
                                                      "sparse": {"decode_ms_per_token": 10.0 * (1.5 - s)}}}},
                    }
                    for cell, res in results.items():
                        cells.append(cell)
                        store.mark_running(cell)
                        store.finish(cell, CellResult("done", wall_s=0.5, **res))
        failed = Cell("bench", "zoo:enc", method="wanda", sparsity=0.99, bench="sst2")
        cells.append(failed)
        store.mark_running(failed)
        store.finish(failed, CellResult("failed", error="RuntimeError: boom"))
        store.set_meta(config={"preset": "quick", "models": list(models)}, plan=[c.hash for c in cells],
                       executor="local")
    return cells


def test_report_has_every_figure_embedded(tmp_path):
    synthetic_study(tmp_path)
    paths = build_report(tmp_path)
    html = paths["html"].read_text()
    md = paths["markdown"].read_text()
    # per model: 3 analysis plots + 1 benchmark + size + speed + 2 trade-offs (quality vs size, vs speed)
    assert paths["figures"] == 2 * 8
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(uris) == 16
    assert all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert "src='http" not in html and "src=\"http" not in html  # self-contained
    for fragment in ("CDF of |w| per block", "ppl vs sparsity", "size on disk", "decode latency", "Summary",
                     "Configuration", "Library versions", "RuntimeError: boom", "preset"):
        assert fragment in html, fragment
    linked = re.findall(r"\]\((report_files/[^)]+)\)", md)
    assert len(linked) == 16 and all((tmp_path / p).is_file() for p in linked)
    # summary: one line per point; the dense reference first
    summary = md[md.index("## Summary"):md.index("## Methods")]  # the headline's tables come before it
    table = [line for line in summary.splitlines() if line.startswith("| zoo:dec |")]
    assert table[0].split("|")[2].strip() == "dense" and len(table) == 5


def test_methods_legend_reads_the_method_registry(tmp_path):
    from prunelab.pruning.registry import get_method_spec

    synthetic_study(tmp_path)
    with Store(tmp_path) as store:  # a method this installation does not know must not break the report
        odd = Cell("bench", "zoo:dec", method="no-such-method", sparsity=0.5, bench="ppl")
        store.mark_running(odd)
        store.finish(odd, CellResult("done", metrics={"value": 30.0, "primary": "ppl", "status": "ok"}))
        store.set_meta(plan=[*store.get_meta("plan"), odd.hash])
    md = build_report(tmp_path)["markdown"].read_text()
    legend = md[md.index("## Methods"):].split("\n\n")[1].splitlines()
    described = {m: get_method_spec(m).description.replace("|", "\\|") for m in ("magnitude", "wanda")}
    described["no-such-method"] = "not in this installation's method registry"
    assert legend[2:] == [f"| {m} | {m} | {d} |" for m, d in sorted(described.items())]


def test_size_numbers_pick_store_fields():
    cell = Cell("size", "m", method="magnitude", sparsity=0.5)

    class R:
        sizes = Sizes(dense_bytes=10, sparse_bytes=6, entropy_bound_bytes=4.5, bitmask_bound_bytes=5.5)

    assert cell.kind == "size"
    assert size_numbers(R()) == {"dense": 10.0, "sparse": 6.0, "bound": 4.5, "bitmask": 5.5}


def render_in_chromium(html_path: Path, tmp: Path, dom_out: list[str] | None = None) -> tuple[str, Path]:
    """Load the page in headless Chromium; return the marker set by a script that waits for images.

    `dom_out`, when given, receives the DOM Chromium rendered (to check what the page opens with).
    """
    probe = tmp / "probe.html"
    script = (
        "<script>function chk(){var im=[].slice.call(document.images);"
        "var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;"
        "document.title='IMAGES '+ok+'/'+im.length;}"
        "window.addEventListener('load',chk);</script>"
    )
    probe.write_text(html_path.read_text().replace("</body>", script + "</body>"))
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"<title>(IMAGES \d+/\d+)</title>", dom.stdout)
    if dom_out is not None:
        dom_out.append(dom.stdout)
    shot = tmp / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,3000", probe.as_uri()],
                   capture_output=True, text=True, timeout=120)
    return (match.group(1) if match else f"no marker; stderr: {dom.stderr[-500:]}"), shot


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium) - cannot render")
def test_report_html_renders_all_images_in_chromium(tmp_path):
    synthetic_study(tmp_path / "study")
    paths = build_report(tmp_path / "study")
    marker, shot = render_in_chromium(paths["html"], tmp_path)
    assert marker == "IMAGES 16/16", marker
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000


def test_report_of_missing_study_is_a_user_error(tmp_path):
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="no results store"):
        build_report(tmp_path / "nothing")


@pytest.mark.slow  # the speed cells compile the runtime's numba kernels (~30 s of CPU on first use)
def test_report_from_a_real_tiny_study(tmp_path, tiny_dirs, data_dir):
    """The whole chain on tiny models: analyze, prune, ppl/sst2, size, speed → report with every figure."""
    from prunelab.study import run_study

    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:12000]
    small = tmp_path / "wiki.small.raw"
    small.write_text(text, encoding="utf-8")
    cfg = {
        "models": [str(tiny_dirs["gpt2"]), str(tiny_dirs["bert"])],
        # alps and a refined method are grid entries like the others (issue 11)
        "methods": ["magnitude", "wanda", "alps", {"name": "wanda", "refine": "swap", "refine_budget": 5}],
        "sparsities": [0.5, 0.9],
        "benchmarks": {str(tiny_dirs["gpt2"]): ["ppl"], str(tiny_dirs["bert"]): ["embed"]},
        "calibration": {"nsamples": 2, "seqlen": 64, "calib": str(small)},
        "eval": {"ppl": {"seqlen": 64, "max_tokens": 512, "data": str(small)}, "embed": {"max_examples": 32}},
        "size": {"methods": ["magnitude"]},
        "speed": {"methods": ["magnitude"], "sparsities": [0.9], "prefill_tokens": 32, "decode_tokens": 4,
                  "repeats": 1},
    }
    summary = run_study(cfg, tmp_path / "study", progress=False)
    assert summary.failed == 0, summary.failures
    paths = build_report(tmp_path / "study")
    # per model: 3 analysis plots + 1 benchmark + size + speed + 2 trade-offs + 2 per-block (sparsity, |w| CDF)
    assert paths["figures"] == 20
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 20
    assert "prefill throughput" in html and "decode latency" in html  # encoder vs decoder speed metric
    md = paths["markdown"].read_text()
    summary = md[md.index("## Summary"):md.index("## Methods")]
    for label in ("alps", "wanda+swap[refine_budget=5]"):  # in the summary table, next to the others, both models
        assert sum(f"| {label} |" in line for line in summary.splitlines()) >= 4, label


def test_results_and_report_commands(tmp_path):
    import csv

    from typer.testing import CliRunner

    from prunelab.cli import app

    cells = synthetic_study(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["results", str(tmp_path), "--csv", str(tmp_path / "rows.csv")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "rows.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(cells)
    assert {r["hash"] for r in rows} == {c.hash for c in cells}
    ppl = [r for r in rows if r["bench"] == "ppl" and r["method"] == "dense"]
    assert float(ppl[0]["value"]) == 20.0
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.html").is_file() and "16 figures" in " ".join(res.output.split())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium) - cannot render")
def test_rendered_report_opens_with_the_headline_and_loads_every_image(tmp_path):
    """Screenshot test: every <img> (figures, trade-offs) decodes in Chromium, the Headline is the first section."""
    synthetic_study(tmp_path / "study")
    paths = build_report(tmp_path / "study")
    n_images = paths["html"].read_text().count("<img ")
    dom: list[str] = []
    marker, shot = render_in_chromium(paths["html"], tmp_path, dom)
    assert marker == f"IMAGES {n_images}/{n_images}", marker
    assert re.findall(r"<h2>([^<]+)</h2>", dom[0])[:2] == ["Headline", "Summary"]
    # 2 models x (quality vs size, vs speed), each caption naming the front and the baselines
    assert dom[0].count("Pareto front circled; dotted: majority class and chance (accuracy panels)</figcaption>") == 4
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_block_profile_and_per_block_figures(tmp_path, tiny_dirs):
    """The worker's per-block |w| profile adds up; the report draws sparsity and CDF per block from it."""
    import torch

    from prunelab.report.blocks import achieved_by_block, block_order, cdf_by_block
    from prunelab.storage import load
    from prunelab.study.worker import PROFILE_EDGES, block_profile

    lm = load(str(tiny_dirs["gpt2"]))
    before = block_profile(lm)
    with torch.no_grad():  # zero the first half of the rows of every prunable matrix of block 0
        for m in lm.prunable:
            if m.block == 0:
                w = m.weight(lm.model)
                w[: w.shape[0] // 2] = 0
    after = block_profile(lm)
    order = block_order(after["blocks"])
    assert order[0] == "decoder.0" and len(order) == len({m.block for m in lm.prunable})
    assert sum(b["numel"] for b in after["blocks"].values()) == sum(m.weight(lm.model).numel() for m in lm.prunable)
    for b in after["blocks"].values():
        assert sum(b["hist"]) == b["numel"] - b["zeros"] and len(b["hist"]) == len(PROFILE_EDGES) + 1
    achieved = achieved_by_block(after, order)
    assert achieved[0] == pytest.approx(0.5, abs=0.01) and max(achieved[1:]) < 0.01
    cdf = cdf_by_block(after)["decoder.0"]
    assert cdf[0] >= 0.5 and cdf[-1] == pytest.approx(1.0) and cdf == sorted(cdf)

    cells = synthetic_study(tmp_path)
    with Store(tmp_path) as store:
        for s in (0.5, 0.9):
            for method in ("magnitude", "wanda"):
                cell = Cell("prune", "zoo:dec", method=method, sparsity=s)
                store.finish(cell, CellResult("done", metrics={"achieved_sparsity_prunable": s,
                                                               "block_profile": {"before": before, "after": after}}))
        store.set_meta(plan=[c.hash for c in cells])
    paths = build_report(tmp_path)
    assert paths["figures"] == 2 * 8 + 2  # zoo:dec gains achieved sparsity per block and the CDF per block
    html = paths["html"].read_text()
    assert "achieved sparsity per block" in html and "CDF of |w| per block before (dashed)" in html


def test_tradeoff_panels_draw_majority_and_chance_levels(tmp_path):
    """Accuracy trade-off panels carry the dev set's majority-class and chance levels; ppl panels none."""
    from prunelab.report.answer import bench_curves
    from prunelab.report.tradeoffs import _panels
    from prunelab.study.store import Store as _Store

    cells = synthetic_study(tmp_path)
    with Store(tmp_path) as store:  # give the sst2 cells the details an accuracy benchmark records
        for cell in [c for c in cells if c.bench == "sst2" and (c.sparsity or 0) < 0.95]:
            value = 0.9 - 0.3 * (cell.sparsity or 0)
            store.mark_running(cell)
            store.finish(cell, CellResult("done", metrics={
                "value": value, "primary": "accuracy", "higher_is_better": True, "status": "ok",
                "details": {"num_classes": 2, "majority_baseline": 0.68}}))
    rows = [r for r in _Store(tmp_path).rows() if r.model == "zoo:enc"]
    panels = _panels(bench_curves(rows), lambda m, s, p: 100 * (1 - s), 100.0, rows)
    assert [p.title for p in panels] == ["sst2"]
    assert panels[0].baselines == {"majority class": 0.68, "chance": 0.5}
    dec = [r for r in _Store(tmp_path).rows() if r.model == "zoo:dec"]
    assert [p.baselines for p in _panels(bench_curves(dec), lambda m, s, p: 1.0, 1.0, dec)] == [{}]
