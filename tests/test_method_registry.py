"""The method registry is the one way down: a method registered once reaches the CLI, studies and the report.

`toy_method.py` (one file, one `register_method` call) is run through `prunelab prune`, a study whose
cells run in spawned worker processes (which learn the method from the study's `plugins:`), and
`prunelab report`. The built-in specs are checked against what the engine and the study accept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_method  # noqa: F401  (registers "toy-half")
from cli_helpers import run_cli
from prunelab.errors import ConfigError
from prunelab.pruning import PruneConfig
from prunelab.pruning.registry import (
    METHODS,
    MethodSpec,
    get_method_spec,
    method_option_names,
    parse_options,
    register_method,
)


def _toy_expected_keep(w: torch.Tensor, k: int) -> torch.Tensor:
    """The toy rule computed independently: a weight survives iff its |w| rank in its row is a multiple of k."""
    ranks = torch.empty_like(w, dtype=torch.long)
    order = w.abs().argsort(dim=1, descending=True, stable=True)
    ranks.scatter_(1, order, torch.arange(w.shape[1]).expand_as(w).contiguous())
    return ranks % k == 0


# ---------------------------------------------------------------------------------------------
# The built-in specs
# ---------------------------------------------------------------------------------------------


def test_builtin_specs_say_what_the_engine_does():
    assert list(METHODS)[:5] == ["magnitude", "magnitude-layer", "wanda", "sparsegpt", "structured"]
    assert {n for n, s in METHODS.items() if s.needs_calibration} >= {"wanda", "sparsegpt", "structured"}
    assert not get_method_spec("magnitude").needs_calibration
    assert [n for n in ("magnitude", "magnitude-layer", "wanda", "sparsegpt", "structured")
            if METHODS[n].owl] == ["magnitude-layer", "wanda", "sparsegpt"]
    assert get_method_spec("structured").supports("unstructured") and not get_method_spec("structured").supports("2:4")
    assert get_method_spec("wanda").supports("N:M") and get_method_spec("wanda").supports("2:4")
    assert all(s.description for s in METHODS.values())
    assert method_option_names("magnitude") == ("nsamples", "seqlen", "calib", "calib_column", "refine",
                                                "refine_budget")
    assert method_option_names("sparsegpt") == ("nsamples", "seqlen", "calib", "calib_column", "owl", "owl_m",
                                                "owl_lambda", "refine", "refine_budget", "blocksize", "percdamp")
    assert method_option_names("structured") == ("nsamples", "seqlen", "calib", "calib_column", "target")
    with pytest.raises(ConfigError, match="unknown method 'nope': choose one of magnitude, .*toy-half"):
        get_method_spec("nope")


def test_prune_config_options_come_from_the_spec():
    cfg = PruneConfig.from_settings("sparsegpt", sparsity=0.3, blocksize=64, owl=True, owl_lambda=0.1)
    assert cfg.options.blocksize == 64 and cfg.options.percdamp == 0.01 and cfg.owl_lambda == 0.1
    d = cfg.to_dict()
    assert d["options"] == {"blocksize": 64, "percdamp": 0.01} and d["method"] == "sparsegpt"
    assert PruneConfig(method="structured", options={"target": "heads"}).options.target == "heads"
    assert PruneConfig(method="wanda").to_dict()["options"] == {}
    for method, settings, fragment in [
        ("wanda", {"blocksize": 64}, "method wanda has no option 'blocksize'"),
        ("sparsegpt", {"blocksize": 0}, "blocksize ≥ 1"),
        ("structured", {"target": "rows"}, "unknown structured target 'rows'"),
        ("structured", {"pattern": "2:4"}, "structured does not support the pattern 2:4"),
        ("magnitude", {"owl": True}, "--owl applies to magnitude-layer, wanda, sparsegpt, alps, not to magnitude"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            PruneConfig.from_settings(method, **settings)
    assert parse_options(["blocksize=64", "percdamp=0.5", "target=heads", "owl=true"]) == {
        "blocksize": 64, "percdamp": 0.5, "target": "heads", "owl": True}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["blocksize"])


def test_register_method_guards_names():
    spec = get_method_spec("toy-half")
    register_method(spec)  # the same spec again (a plug-in imported twice) is fine
    with pytest.raises(ConfigError, match="already registered"):
        register_method(MethodSpec("toy-half", "elsewhere:prune"))
    with pytest.raises(ConfigError, match="cannot register method 'dense'"):
        register_method(MethodSpec("dense", "elsewhere:prune"))
    with pytest.raises(ConfigError, match="patterns"):
        register_method(MethodSpec("toy-bad", "elsewhere:prune", patterns=("blocks",)))
    assert "toy-bad" not in METHODS and "dense" not in METHODS


def test_registry_import_does_not_import_torch():
    """The CLI lists the registry in `--help`: reading it must stay cheap."""
    code = "import sys, prunelab.cli, prunelab.pruning.registry as r; assert r.METHODS; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# The toy plug-in end to end: prunelab prune, a study in worker processes, prunelab report
# ---------------------------------------------------------------------------------------------


def test_toy_method_through_prunelab_prune(tiny_dirs, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    for k, expected in ((2, 0.5), (4, 0.75)):
        out = tmp_path / f"toy{k}"
        code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "toy-half",
                             "--sparsity", "0.5", "--opt", f"keep_every={k}", "--out", str(out))
        assert code == 0, text
        report = json.loads((out / "prune_report.json").read_text())
        assert report["method"] == "toy-half" and report["config"]["options"] == {"keep_every": k}
        assert report["achieved_sparsity_prunable"] == pytest.approx(expected)
        assert report["calibration"] == {}  # the spec says it needs no calibration
        pruned = AutoModelForCausalLM.from_pretrained(str(out))
        w0 = dense.model.layers[0].mlp.up_proj.weight.detach()
        w1 = pruned.model.layers[0].mlp.up_proj.weight.detach()
        assert torch.equal(w1 != 0, _toy_expected_keep(w0, k))
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "toy-half",
                         "--opt", "blocksize=4", "--out", str(tmp_path / "bad"))
    assert code == 2 and "no option 'blocksize'" in text and "keep_every" in text
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "nope",
                         "--out", str(tmp_path / "bad"))
    assert code == 2 and "toy-half" in " ".join(text.split())
    assert not (tmp_path / "bad").exists()


def test_toy_method_through_a_study_and_the_report(tiny_dirs, small_text, tmp_path, monkeypatch, capsys):
    from prunelab.study import Store, load_config, run_study

    grid = {
        "plugins": ["toy_method"],
        "models": [str(tiny_dirs["gpt2"])],
        "methods": [{"name": "toy-half", "keep_every": 2}, "magnitude-layer"],
        "sparsities": [0.5],
        "benchmarks": ["ppl"],
        "analyze": False, "size": False, "speed": False,
        "eval": {"ppl": {"seqlen": 64, "max_tokens": 512, "data": str(small_text)}},
    }
    with pytest.raises(ConfigError, match=r"methods\[0\] 'toy-half' has unknown option 'k': allowed keep_every"):
        load_config({**grid, "methods": [{"name": "toy-half", "k": 2}]})
    with pytest.raises(ConfigError, match=r"plugins\[0\]: plugin module 'no_such_plugin' cannot be imported"):
        load_config({**grid, "plugins": ["no_such_plugin"]})
    out = tmp_path / "study"
    summary = run_study(grid, out, jobs=2, progress=False)  # spawned workers: they import the plug-in themselves
    assert summary.failed == 0, summary.failures
    with Store(out) as store:
        rows = store.rows()
    prune_rows = {r.method: r for r in rows if r.kind == "prune"}
    assert set(prune_rows) == {"toy-half", "magnitude-layer"}
    toy = prune_rows["toy-half"]
    assert toy.metrics["achieved_sparsity_prunable"] == pytest.approx(0.5)
    toy_ppl = next(r for r in rows if r.kind == "bench" and r.method == "toy-half")
    assert toy_ppl.status == "done" and toy_ppl.metrics["value"] > 1
    code, text = run_cli(monkeypatch, capsys, "report", str(out))
    assert code == 0, text
    md = (out / "report.md").read_text()
    assert "toy-half[keep_every=2]" in md and "magnitude-layer" in md
    # A fresh `prunelab report` process never registered the toy (the plug-in is importable, not imported).
    (out / "report.md").unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "from prunelab.cli import main; main()", "report", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = (out / "report.md").read_text()
    assert fresh.count("toy-half[keep_every=2]") == md.count("toy-half[keep_every=2]") > 0


def test_study_accepts_owl_options_and_rejects_foreign_ones(tiny_dirs):
    from prunelab.study import load_config, plan

    base = {"models": [str(tiny_dirs["gpt2"])], "sparsities": [0.5], "benchmarks": ["ppl"], "analyze": False,
            "size": False, "speed": False}
    cfg = load_config({**base, "methods": [{"name": "wanda", "owl": True, "owl_m": 3.0, "owl_lambda": 0.05}]})
    cell = next(c for c in plan(cfg, families={str(tiny_dirs["gpt2"]): ("decoder", False)}) if c.kind == "prune")
    assert cell.method_options == {"owl": True, "owl_m": 3.0, "owl_lambda": 0.05}
    with pytest.raises(ConfigError, match="'wanda' has unknown option 'blocksize'"):
        load_config({**base, "methods": [{"name": "wanda", "blocksize": 64}]})
    with pytest.raises(ConfigError, match="'magnitude' has unknown option 'owl': allowed nsamples, seqlen, calib, "
                                          "calib_column, refine, refine_budget$"):
        load_config({**base, "methods": [{"name": "magnitude", "owl": True}]})
    with pytest.raises(ConfigError, match="methods\\[0\\] 'sparsegpt': sparsegpt needs blocksize"):
        load_config({**base, "methods": [{"name": "sparsegpt", "blocksize": 0}]})
