"""Study: config validation, stable cell hashes, the SQLite store, resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from prunelab.errors import ConfigError
from prunelab.study import Cell, CellResult, Store, load_config, plan, run_study
from prunelab.study.store import export_csv

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny grid with small data files so every cell takes well under a second
# ---------------------------------------------------------------------------------------------



def tiny_grid(tiny_dirs, small_text, **over) -> dict:
    """2 tiny decoders × magnitude/wanda × 2 sparsities × ppl (+ size), as a study config dict."""
    cfg = {
        "models": [str(tiny_dirs["gpt2"]), str(tiny_dirs["llama"])],
        "methods": ["magnitude", "wanda"],
        "sparsities": [0.5, 0.9],
        "benchmarks": ["ppl"],
        "analyze": False,
        "size": False,
        "speed": False,
        "calibration": {"nsamples": 4, "seqlen": 64, "calib": str(small_text)},
        "eval": {"ppl": {"seqlen": 64, "max_tokens": 1024, "data": str(small_text)}},
    }
    cfg.update(over)
    return cfg


def bench_values(out: Path) -> dict[str, tuple[str, float | None, float | None]]:
    """hash -> (status, bench value, achieved sparsity) for every row of a study."""
    with Store(out) as store:
        return {r.hash: (r.status, r.metrics.get("value"), r.metrics.get("achieved_sparsity_prunable"))
                for r in store.rows()}


# ---------------------------------------------------------------------------------------------
# Config validation: bad entries are rejected before any work, naming the entry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"models": ["zoo:nope"]}, "models[0] 'zoo:nope'"),
        ({"models": ["{gpt2}", "/no/such/model/dir"]}, "models[1] '/no/such/model/dir'"),
        ({"models": ["{gpt2}", "gpt2-typo-not-cached"]}, "models[1] 'gpt2-typo-not-cached'"),
        ({"methods": ["magnitude", "magnitud"]}, "methods[1] 'magnitud'"),
        ({"methods": [{"name": "wanda", "owll": True}]}, "unknown option 'owll'"),
        ({"benchmarks": ["ppl", "perplexity"]}, "benchmarks[1] 'perplexity'"),
        ({"sparsities": [0.5, 1.0]}, "sparsities[1] 1.0 is outside [0, 1)"),
        ({"sparsities": [-0.1]}, "sparsities[0] -0.1 is outside [0, 1)"),
        ({"sparsities": ["half"]}, "sparsities[0] 'half' is not a number"),
        ({"patterns": ["2-4"]}, "patterns[0] '2-4'"),
        ({"sparsity": [0.5]}, "unknown key 'sparsity'"),
        ({"eval": {"ppl": {"max_tokenz": 5}}}, "eval.ppl has unknown key 'max_tokenz'"),
        ({"eval": {"zeroshot": {"tasks": ["rte", "squad"]}}}, "eval.zeroshot.tasks: unknown zero-shot task 'squad'"),
        ({"eval": {"zeroshot": {"limit": 0}}}, "eval.zeroshot.limit 0 is not a positive number"),
        ({"eval": {"ppl": {"limit": 3}}}, "eval.ppl has unknown key 'limit'"),
        ({"speed": {"sparsities": [1.5]}}, "speed.sparsities[0] 1.5"),
        ({"model_overrides": {"zoo:minilm": {"calibration": {"nsamples": 2}}}}, "entry for 'zoo:minilm'"),
        ({"model_overrides": {"{gpt2}": {"calibration": {"n": 2}}}}, "calibration has unknown key 'n'"),
    ],
)
def test_bad_config_entries_are_named(tiny_dirs, override, fragment):
    cfg = {"models": [str(tiny_dirs["gpt2"])], "methods": ["magnitude"], "sparsities": [0.5]}
    for key, value in override.items():
        if key == "models":
            value = [str(tiny_dirs["gpt2"]) if v == "{gpt2}" else v for v in value]
        if key == "model_overrides":
            value = {str(tiny_dirs["gpt2"]) if k == "{gpt2}" else k: v for k, v in value.items()}
        cfg[key] = value
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_config_rejected_by_cli_before_work(tmp_path, tiny_dirs):
    """The CLI exits 2 with the entry named and creates nothing in --out."""
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"models": [str(tiny_dirs["gpt2"])], "methods": ["magnitude"],
                                      "sparsities": [0.5, 0.9, 1.2]}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "from prunelab.cli import main; main()", "study", str(config),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "sparsities[2] 1.2 is outside [0, 1)" in " ".join(proc.stderr.split())
    assert not out.exists()


def test_presets_and_overrides():
    quick = load_config(None, preset="quick")
    default = load_config(None)
    assert default.models == ["zoo:minilm", "zoo:smollm2", "zoo:whisper-tiny-en"]
    assert default.sparsities == [0.1, 0.5, 0.9, 0.95, 0.99]
    assert [m.name for m in default.methods] == ["magnitude", "wanda", "sparsegpt"]
    assert quick.calibration["nsamples"] < default.calibration["nsamples"]
    assert quick.eval["sst2"]["train_limit"] < default.eval["sst2"]["train_limit"]
    over = load_config({"eval": {"ppl": {"max_tokens": 99}}, "preset": "quick"})
    assert over.eval["ppl"]["max_tokens"] == 99 and over.eval["ppl"]["seqlen"] == quick.eval["ppl"]["seqlen"]
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_config(None, preset="fast")


# ---------------------------------------------------------------------------------------------
# Cells and the grid
# ---------------------------------------------------------------------------------------------


def test_cell_hash_is_sha256_of_canonical_config():
    cell = Cell("bench", "zoo:smollm2", method="wanda", sparsity=0.5, bench="ppl",
                prune={"seed": 0, "nsamples": 16, "seqlen": 256}, options={"seqlen": 512, "max_tokens": 4096})
    expected = hashlib.sha256(json.dumps(cell.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert cell.hash == expected
    # Golden value: a change here silently invalidates every stored study; bump SCHEMA on purpose instead.
    assert cell.hash == "ddad4a6543960d4bdc648d2bc7ed541b83cd5cf21f3e8b0a5b834b7a8a96e387"
    same = Cell("bench", "zoo:smollm2", method="wanda", sparsity=0.5000000001, bench="ppl",
                prune={"seqlen": 256, "nsamples": 16, "seed": 0}, options={"max_tokens": 4096, "seqlen": 512},
                resources={"num_cpus": 4})
    assert same.hash == cell.hash  # key order, float noise and resources do not matter
    for changed in (
        Cell("bench", "zoo:smollm2", method="wanda", sparsity=0.9, bench="ppl", prune=cell.prune,
             options=cell.options),
        Cell("bench", "zoo:smollm2", method="wanda", sparsity=0.5, bench="ppl", prune={**cell.prune, "seed": 1},
             options=cell.options),
        Cell("bench", "zoo:smollm2", method="wanda", sparsity=0.5, bench="ppl", prune=cell.prune,
             options={**cell.options, "max_tokens": 8}),
        Cell("size", "zoo:smollm2", method="wanda", sparsity=0.5, prune=cell.prune),
    ):
        assert changed.hash != cell.hash
    # Cells of one pruning point share the checkpoint key; another sparsity does not.
    assert Cell("size", "zoo:smollm2", method="wanda", sparsity=0.5, prune=cell.prune).point_hash == cell.point_hash


def test_plan_expands_grid(tiny_dirs, small_text):
    cfg = load_config(tiny_grid(tiny_dirs, small_text, models=[str(tiny_dirs["gpt2"]), str(tiny_dirs["bert"])],
                                benchmarks="default", analyze=True, size=True,
                                speed={"sparsities": [0.9], "methods": ["magnitude"]}))
    cells = plan(cfg)
    kinds = Counter(c.kind for c in cells)
    # per model: 1 analyze, 2 methods × 2 sparsities = 4 prune/size points, speed at 1 point
    assert kinds["analyze"] == 2 and kinds["prune"] == 8 and kinds["size"] == 8 and kinds["speed"] == 2
    gpt2_benches = {c.bench for c in cells if c.kind == "bench" and c.model == str(tiny_dirs["gpt2"])}
    bert_benches = {c.bench for c in cells if c.kind == "bench" and c.model == str(tiny_dirs["bert"])}
    assert gpt2_benches == {"ppl", "sst2"} and bert_benches == {"sst2", "mrpc", "embed"}
    # dense reference + 4 points, per benchmark
    assert kinds["bench"] == 5 * 2 + 5 * 3
    assert len({c.hash for c in cells}) == len(cells)
    # magnitude needs no calibration: its cells do not depend on the calibration settings
    mag = next(c for c in cells if c.kind == "prune" and c.method == "magnitude")
    assert "nsamples" not in mag.prune
    wanda = next(c for c in cells if c.kind == "prune" and c.method == "wanda")
    assert wanda.prune["nsamples"] == 4


def test_preset_speed_filter_follows_the_studys_methods(tiny_dirs, small_text):
    cfg = tiny_grid(tiny_dirs, small_text, methods=["wanda"])
    cfg.pop("speed")  # inherit the preset's speed (magnitude only): falls back to the study's method
    speed = [c for c in plan(load_config(cfg)) if c.kind == "speed"]
    assert speed and {c.method for c in speed} == {"wanda"}
    with pytest.raises(ConfigError, match="speed.methods\\[0\\] 'magnitude'"):
        load_config(tiny_grid(tiny_dirs, small_text, methods=["wanda"], speed={"methods": ["magnitude"]}))


def test_model_overrides_change_only_that_models_cells(tiny_dirs, small_text):
    base = plan(load_config(tiny_grid(tiny_dirs, small_text)))
    over = plan(load_config(tiny_grid(tiny_dirs, small_text, model_overrides={
        str(tiny_dirs["llama"]): {"calibration": {"nsamples": 2}, "eval": {"ppl": {"max_tokens": 256}}}})))
    changed = {c.hash for c in base} ^ {c.hash for c in over}
    gpt2 = str(tiny_dirs["gpt2"])
    assert {c.hash for c in base if c.model == gpt2} == {c.hash for c in over if c.model == gpt2}
    llama_over = [c for c in over if c.model != gpt2]
    assert changed and all(c.prune.get("nsamples", 2) == 2 for c in llama_over)
    assert all(c.options["max_tokens"] == 256 for c in llama_over if c.kind == "bench")
    # the default preset calibrates the speech model on 2 clips (1500 encoder frames each)
    default = load_config(None)
    assert default.calibration_for("zoo:whisper-tiny-en")["nsamples"] == 2
    assert default.calibration_for("zoo:smollm2")["nsamples"] == 8


def test_nm_pattern_is_one_point_per_method(tiny_dirs, small_text):
    cells = plan(load_config(tiny_grid(tiny_dirs, small_text, patterns=["unstructured", "2:4"])))
    prunes = [c for c in cells if c.kind == "prune" and c.model == str(tiny_dirs["gpt2"])]
    assert sorted((c.method, c.pattern, c.sparsity) for c in prunes) == sorted(
        [(m, "unstructured", s) for m in ("magnitude", "wanda") for s in (0.5, 0.9)]
        + [(m, "2:4", 0.5) for m in ("magnitude", "wanda")]
    )


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


def test_store_is_wal_and_transactional(tmp_path):
    cell = Cell("bench", "m", method="magnitude", sparsity=0.5, bench="ppl")
    with Store(tmp_path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.mark_running(cell, pid=123)
        assert store.status_of() == {cell.hash: "running"}
        store.finish(cell, CellResult("done", metrics={"value": 12.5}, wall_s=1.0, peak_rss_bytes=7,
                                      versions={"torch": "x"}))
        with pytest.raises(RuntimeError), store.transaction() as c:  # a failed transaction leaves no trace
            c.execute("UPDATE cells SET status = 'failed'")
            raise RuntimeError("boom")
    # A second connection (another process reading while a study writes) sees the committed row.
    other = sqlite3.connect(str(tmp_path / "results.sqlite"))
    assert other.execute("SELECT status, attempts FROM cells").fetchall() == [("done", 1)]
    with Store(tmp_path) as store:
        (row,) = store.rows()
        assert row.metrics == {"value": 12.5} and row.versions == {"torch": "x"} and row.cell.hash == cell.hash
        csv_path = export_csv([row], tmp_path / "rows.csv")
    header = csv_path.read_text().splitlines()[0]
    assert "metric.value" in header.split(",") or "value" in header.split(",")


# ---------------------------------------------------------------------------------------------
# Running, resuming, killing
# ---------------------------------------------------------------------------------------------


def test_study_runs_and_second_run_skips_everything(tmp_path, tiny_dirs, small_text):
    cfg = tiny_grid(tiny_dirs, small_text, size=True)
    out = tmp_path / "study"
    first = run_study(cfg, out, progress=False)
    assert first.failed == 0, first.failures
    assert first.done == first.planned == 2 * (1 + 4 * 3)
    values = bench_values(out)
    dense = [v for h, v in values.items() if v[1] is not None]
    assert all(v[0] == "done" for v in values.values()) and dense
    with Store(out) as store:
        rows = store.rows()
        assert all(r.versions.get("torch") and r.wall_s is not None and r.peak_rss_bytes for r in rows)
        prune_rows = [r for r in rows if r.kind == "prune"]
        for r in prune_rows:
            assert r.metrics["achieved_sparsity_prunable"] == pytest.approx(r.sparsity, abs=0.01)
        size_rows = [r for r in rows if r.kind == "size"]
        for r in size_rows:  # the sparse format beats the dense checkpoint at these sparsities
            assert 0 < r.sizes.sparse_bytes < r.sizes.dense_bytes
        assert all(Path(r.log_path).is_file() for r in rows)
        stamps = {r.hash: r.finished_at for r in rows}
    # Checkpoints are removed once every cell of their point is done (keep_checkpoints: false).
    assert not any((out / "checkpoints").glob("*/config.json"))
    second = run_study(cfg, out, progress=False)
    assert second.skipped == second.planned and second.done == 0
    with Store(out) as store:
        assert {r.hash: r.finished_at for r in store.rows()} == stamps


def _study_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from prunelab.cli import main; main()", "study", str(config), "--out", str(out),
            "--no-progress"]


def _poll(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        rows = con.execute("SELECT status FROM cells").fetchall()
        con.close()
    except sqlite3.Error:
        return 0, 0
    c = Counter(s for (s,) in rows)
    return c["done"], c["running"]


def test_sigkill_during_a_cell_then_resume(tmp_path, tiny_dirs, small_text):
    """Kill -9 mid-study, rerun the same command: finished rows untouched, results = uninterrupted run."""
    config = tmp_path / "study.yaml"
    grid = tiny_grid(tiny_dirs, small_text, models=[str(tiny_dirs["llama"])])
    config.write_text(yaml.safe_dump(grid))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen(_study_cmd(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "results.sqlite"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        done, running = _poll(db)
        if done >= 3 and running >= 1:
            proc.send_signal(signal.SIGKILL)
            killed_at = (done, running)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, f"study ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    with Store(out) as store:
        before = {r.hash: (r.finished_at, r.metrics, r.started_at) for r in store.rows() if r.status == "done"}
        running = [r.hash for r in store.rows() if r.status == "running"]
    assert before  # (`running` is empty only if the kill fell between two transactions: still a valid test)

    rerun = subprocess.run(_study_cmd(config, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already done" in rerun.stdout
    with Store(out) as store:
        rows = {r.hash: r for r in store.rows()}
    assert all(r.status == "done" for r in rows.values())
    for h, (finished_at, metrics, started_at) in before.items():  # finished cells were not recomputed
        assert (rows[h].finished_at, rows[h].metrics, rows[h].started_at) == (finished_at, metrics, started_at)
    for h in running:  # the killed cell was redone from scratch (second attempt)
        assert rows[h].attempts == 2

    clean = tmp_path / "clean"
    summary = run_study(grid, clean, progress=False)
    assert summary.failed == 0
    resumed, fresh = bench_values(out), bench_values(clean)
    assert resumed.keys() == fresh.keys()
    for h in fresh:
        assert resumed[h][0] == fresh[h][0] == "done"
        for a, b in zip(resumed[h][1:], fresh[h][1:], strict=True):
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-6)


def test_failing_cell_is_recorded_not_fatal(tmp_path, tiny_dirs, small_text):
    """A benchmark that cannot run fails its own cells only, with the error in the row."""
    cfg = tiny_grid(tiny_dirs, small_text, models=[str(tiny_dirs["gpt2"])], methods=["magnitude"],
                    sparsities=[0.5], eval={"ppl": {"seqlen": 64, "data": str(tmp_path / "missing.raw")}})
    summary = run_study(cfg, tmp_path / "out", progress=False)
    assert summary.failed == 2 and summary.done == 1  # dense ppl + pruned ppl fail; prune is fine
    with Store(tmp_path / "out") as store:
        failed = [r for r in store.rows() if r.status == "failed"]
    assert all(r.kind == "bench" and r.error for r in failed)
    assert all("Traceback" in Path(r.log_path).read_text() for r in failed)


def test_example_full_study_config_is_valid():
    """The example config shipped in examples/ must stay loadable as the schema evolves."""
    from pathlib import Path

    from prunelab.study.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "study-full.yaml"
    config = load_config(str(path))
    assert config is not None


def test_zeroshot_limit_and_tasks_in_a_study_config(tiny_dirs):
    """`eval.zeroshot` takes the CLI's `--limit` and `zeroshot:tasks`; the preset's small limit yields to the user's."""
    cfg = {"models": [str(tiny_dirs["gpt2"])], "methods": ["magnitude"], "sparsities": [0.5],
           "benchmarks": ["ppl", "zeroshot"], "eval": {"zeroshot": {"limit": 3, "tasks": ["rte", "piqa"]}}}
    config = load_config(cfg)
    assert config.eval_for(str(tiny_dirs["gpt2"]), "zeroshot") == {"limit": 3, "tasks": ["rte", "piqa"]}
    assert load_config(None).eval["zeroshot"]["limit"] < 100  # the demo preset keeps zero-shot small
    assert load_config(str(REPO / "examples" / "study-full.yaml")).eval["zeroshot"]["limit"] == 500
