"""`--refine` as an engine step after any method, and OWL for every method whose spec says so (issue 11).

Through `prune()`: the per-matrix layer errors the engine records before/after refine never rise,
per-row and N:M counts are those of the unrefined method, the checkpoint report carries the
refine and OWL sections; the CLI and study configs accept `refine` and refuse bad names.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import run_cli
from prunelab.errors import ConfigError
from prunelab.pruning import PruneConfig, prune
from prunelab.pruning.patterns import check_nm
from prunelab.storage import load

SMALL = {"nsamples": 4, "seqlen": 32, "seed": 1}


def _pruned(tiny_dirs, arch: str, method: str, **settings):
    lm = load(str(tiny_dirs[arch]))
    return lm, prune(lm, PruneConfig.from_settings(method, **SMALL, **settings))


@pytest.mark.parametrize(("arch", "method", "settings"), [
    ("llama", "wanda", {"sparsity": 0.6}),
    ("gpt2", "magnitude", {"sparsity": 0.5}),
    ("bert", "magnitude-layer", {"pattern": "2:4"}),
    ("bart", "sparsegpt", {"sparsity": 0.5}),
])
def test_refine_step_never_raises_a_matrix_error_and_keeps_counts(tiny_dirs, arch, method, settings,
                                                                  one_thread_unless_slow):
    _, plain = _pruned(tiny_dirs, arch, method, **settings)
    lm, result = _pruned(tiny_dirs, arch, method, refine="swap", refine_budget=20, **settings)
    section = result.to_dict()["refine"]
    assert section["name"] == "swap" and section["budget"] == 20
    assert section["reconstruct"] == (method == "sparsegpt")
    errors = section["matrices"]
    assert set(errors) == {m.name for m in lm.prunable if m.block >= 0}
    assert all(e["after"] <= e["before"] * (1 + 1e-6) + 1e-12 for e in errors.values()), errors
    assert section["error_after"] < section["error_before"]
    assert "refine" in result.timings and result.calibration  # calibration built even for magnitude
    nm = result.config.nm
    for m in lm.prunable:
        old, new, w = plain.masks[m.name], result.masks[m.name], m.weight(lm.model)
        assert torch.equal(old.sum(1), new.sum(1)), m.name  # every row keeps its count
        assert bool((w[~new] == 0).all())
        assert nm is None or check_nm(new, *nm)
    assert [r.pruned for r in result.matrices] == [r.pruned for r in plain.matrices]
    assert sum(not torch.equal(plain.masks[n], result.masks[n]) for n in plain.masks) > 0  # it did swap


def test_refine_validation_names_the_known_refiners_and_methods():
    with pytest.raises(ConfigError, match="^unknown --refine 'nope': choose one of swap$"):
        PruneConfig.from_settings("wanda", refine="nope")
    with pytest.raises(ConfigError, match="--refine applies to magnitude, magnitude-layer, wanda, sparsegpt, alps, "
                                          "not to structured"):
        PruneConfig.from_settings("structured", refine="swap")
    with pytest.raises(ConfigError, match="refine_budget 0"):
        PruneConfig.from_settings("wanda", refine="swap", refine_budget=0)
    assert PruneConfig.from_settings("magnitude", refine="swap").needs_calibration
    assert not PruneConfig.from_settings("magnitude").needs_calibration


@pytest.mark.parametrize("method", ["magnitude-layer", "wanda"])
def test_owl_profile_is_in_the_report(tiny_dirs, method, one_thread_unless_slow):
    lm, result = _pruned(tiny_dirs, "llama", method, sparsity=0.5, owl=True, owl_lambda=0.1)
    profile = result.to_dict()["owl"]
    blocks = sorted({f"{m.stack}.{m.block}" for m in lm.prunable if m.block >= 0})
    assert sorted(profile) == blocks
    assert len({round(v, 3) for v in profile.values()}) > 1  # non-uniform
    assert all(0.5 - 0.1 - 0.01 <= v <= 0.5 + 0.1 + 0.01 for v in profile.values()), profile
    assert abs(sum(profile.values()) / len(profile) - 0.5) < 0.01
    for r in result.matrices:  # each matrix carries its block's ratio
        assert abs(r.pruned / r.numel - profile[f"{r.stack}.{r.block}"]) < 0.01


def test_owl_with_nm_and_owl_for_global_magnitude_are_one_line_errors():
    with pytest.raises(ConfigError, match="use it with --pattern unstructured"):
        PruneConfig.from_settings("wanda", pattern="2:4", owl=True)
    with pytest.raises(ConfigError, match="--owl applies to magnitude-layer, wanda, sparsegpt, alps, not to magnitude"):
        PruneConfig.from_settings("magnitude", owl=True)


def test_cli_refine_writes_its_section(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pruned"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--refine", "swap",
                         "--nsamples", "2", "--seqlen", "16", "--opt", "refine_budget=5", "--out", str(out))
    assert code == 0, text
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config"]["refine"] == "swap" and report["config"]["refine_budget"] == 5
    assert report["refine"]["error_after"] <= report["refine"]["error_before"]


@pytest.mark.parametrize(("args", "fragment"), [
    (("--method", "wanda", "--refine", "nope"), "unknown --refine 'nope': choose one of swap"),
    (("--method", "structured", "--refine", "swap"), "--refine applies to"),
])
def test_cli_bad_refine_is_one_line_exit_2_and_writes_nothing(tiny_dirs, tmp_path, monkeypatch, capsys, args,
                                                              fragment):
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), *args, "--out", str(out))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_study_refine_is_its_own_grid_entry(tiny_dirs):
    from prunelab.study import load_config, plan

    model = str(tiny_dirs["gpt2"])
    base = {"models": [model], "sparsities": [0.5], "benchmarks": ["ppl"], "analyze": False, "size": False,
            "speed": False}
    cfg = load_config({**base, "methods": ["wanda", {"name": "wanda", "refine": "swap"},
                                           {"name": "magnitude", "refine": "swap", "nsamples": 8}, "magnitude"]})
    cells = [c for c in plan(cfg, families={model: ("decoder", False)}) if c.kind == "prune"]
    assert [c.method_label for c in cells] == ["wanda", "wanda+swap", "magnitude+swap", "magnitude"]
    assert len({c.point_hash for c in cells}) == 4
    assert cells[2].prune["nsamples"] == 8 and "nsamples" not in cells[3].prune  # refine calibrates magnitude
    assert cells[1].method_options == {"refine": "swap"}
    with pytest.raises(ConfigError, match="methods\\[0\\] 'wanda': unknown --refine 'nope': choose one of swap"):
        load_config({**base, "methods": [{"name": "wanda", "refine": "nope"}]})
