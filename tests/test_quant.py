"""Quantizing the kept weights jointly with pruning (issue 14, items 1 and 3).

Numerical cores on a small random layer with a real H = XᵀX/n (GPTQ's joint sweep against
SparseGPT followed by round-to-nearest, on the same inputs and the same mask), then `prune(...,
quant=...)` on tiny models (integers in range, zeros where pruned, exact counts, N:M validity,
`lm.quant` consistent with the weights), then the CLI's bad-input cases.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import run_cli
from layer_problems import correlated_problem
from prunelab.errors import ConfigError
from prunelab.pruning import PruneConfig, prune
from prunelab.pruning.patterns import check_nm, nm_target_count, target_count
from prunelab.pruning.quantize import gptq_on_support, head_modules, head_scheme, rtn_in_place
from prunelab.pruning.refine import reconstruction_error
from prunelab.pruning.sparsegpt import obs_solve, refit_scales, sparsegpt_matrix
from prunelab.quant import QuantScheme, quantize_rtn
from prunelab.storage import load

INT4 = QuantScheme(4, 32)
INT8 = QuantScheme(8, None)


def _problem(rows: int = 48, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return correlated_problem(rows, cols, seed)


def _rtn(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    q, info = quantize_rtn(w, scheme)
    return info.dequantize(q)


def _check_on_grid(w: torch.Tensor, info, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The integers of `w`: in range, reproducing `w` exactly, 0 wherever `keep` is False."""
    q = info.ints(w)
    assert int(q.min()) >= info.scheme.qmin and int(q.max()) <= info.scheme.qmax
    assert torch.equal(info.dequantize(q), w)
    if keep is not None:
        assert bool((w[~keep] == 0).all()) and bool((q[~keep] == 0).all())
    return q


# -- numerical cores -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [INT4, INT8], ids=["int4g32", "int8"])
def test_rtn_in_range_and_zeros_stay_zero(scheme):
    W, _ = _problem(seed=1)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) > 0.6
    w = W * keep
    info = rtn_in_place(w, scheme)
    assert info.scales.shape == (W.shape[0], scheme.groups(W.shape[1])[0]) and info.scales.dtype == torch.float32
    _check_on_grid(w, info, keep)


@pytest.mark.parametrize("scheme", [INT4, QuantScheme(4, 128), INT8], ids=["int4g32", "int4g128", "int8"])
@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.5, (2, 4)), (0.7, None)])
def test_joint_sparsegpt_quant_beats_sparsegpt_then_rtn(sparsity, nm, scheme):
    """The issue's check: GPTQ error feedback inside the sweep < SparseGPT, then round-to-nearest,
    on the same inputs (H) and, for unstructured sparsity, the very same mask."""
    W, H = _problem()
    sg, keep = sparsegpt_matrix(W, H, sparsity, nm)
    rtn = _rtn(sg, scheme)
    joint, jkeep, info = obs_solve(W, H, sparsity, nm, quant=scheme)
    _check_on_grid(joint, info, jkeep)
    expect = nm_target_count(*W.shape, *nm) if nm else target_count(sparsity, W.numel())
    assert int((~jkeep).sum()) == expect and (nm is None or check_nm(joint != 0, *nm))
    assert nm is not None or torch.equal(jkeep, keep)
    base = reconstruction_error(W, sg, H)
    assert reconstruction_error(W, joint, H) - base < 0.9 * (reconstruction_error(W, rtn, H) - base)


def test_gptq_on_a_fixed_support_beats_rtn_of_the_solution():
    """alps' path: one GPTQ sweep on the support of an already reconstructed matrix."""
    W, H = _problem(seed=4)
    sg, keep = sparsegpt_matrix(W, H, 0.6)
    fixed, info = gptq_on_support(sg, H, keep, INT4)
    _check_on_grid(fixed, info, keep)
    assert reconstruction_error(W, fixed, H) < reconstruction_error(W, _rtn(sg, INT4), H)


@pytest.mark.parametrize("scheme", [INT4, INT8], ids=["int4g32", "int8"])
def test_scale_refit_lowers_the_layer_error_and_keeps_the_integers(scheme):
    W, H = _problem(seed=6)
    sg, keep = sparsegpt_matrix(W, H, 0.5, (2, 4))
    q, info = quantize_rtn(sg, scheme)
    new = refit_scales(W, info.levels(q), info, H.double())
    assert (new.zeros is None) == (info.zeros is None) and (new.zeros is None or torch.equal(new.zeros, info.zeros))
    assert bool((new.scales > 0).all()) and not torch.equal(new.scales, info.scales)
    w = new.dequantize(q)
    assert torch.equal(_check_on_grid(w, new, keep), q)
    base = reconstruction_error(W, sg, H)
    assert reconstruction_error(W, w, H) - base < 0.8 * (reconstruction_error(W, info.dequantize(q), H) - base)


def test_int8_is_per_row_and_joint_never_loses_a_row_to_rtn():
    W, H = _problem(rows=8, cols=64, seed=3)
    sg, _ = sparsegpt_matrix(W, H, 0.5, None, blocksize=16)
    joint, keep, info = obs_solve(W, H, 0.5, None, quant=INT8, blocksize=16)
    assert info.scales.shape == (8, 1)
    _check_on_grid(joint, info, keep)
    rows = lambda X: ((W.double() - X.double()) @ H.double() * (W.double() - X.double())).sum(1)  # noqa: E731
    assert bool((rows(joint) <= rows(_rtn(sg, INT8)) + 1e-9).all())


def test_quant_config_errors():
    with pytest.raises(ConfigError, match="unknown --quant 'int3'"):
        PruneConfig(method="wanda", quant="int3")
    with pytest.raises(ConfigError, match="--group-size applies to quantized runs"):
        PruneConfig(method="wanda", group_size=32)
    with pytest.raises(ConfigError, match="positive integer"):
        PruneConfig(method="wanda", quant="int4", group_size=0)
    cfg = PruneConfig.from_settings("sparsegpt", quant="int4")
    assert cfg.quant_scheme == QuantScheme(4, 128) and cfg.to_dict()["quant"] == "int4"
    assert PruneConfig(method="sparsegpt", quant="int8", refine="swap").joint_quant is None


def test_default_int4_group_size_fits_each_matrix_and_an_explicit_one_must_divide():
    cfg = PruneConfig(method="wanda", quant="int4")
    assert cfg.quant_for(576) == QuantScheme(4, 64) and cfg.quant_for(1536) == QuantScheme(4, 128)
    assert cfg.quant_for(360) == QuantScheme(4, 8) and cfg.quant_for(720) == QuantScheme(4, 16)
    with pytest.raises(ConfigError, match="does not divide in_features=90 of down"):
        cfg.quant_for(90, "down")
    with pytest.raises(ConfigError, match="--group-size 128 does not divide in_features=576 of q_proj"):
        PruneConfig(method="wanda", quant="int4", group_size=128).quant_for(576, "q_proj")
    assert PruneConfig(method="wanda", quant="int8").quant_for(576) == QuantScheme(8, None)


# -- prune() on tiny models ------------------------------------------------------------------------


CASES = [
    ("sparsegpt", "unstructured", "int4", "gpt2"),
    ("sparsegpt", "2:4", "int8", "llama"),
    ("alps", "2:4", "int4", "llama"),
    ("wanda", "unstructured", "int8", "bert"),
    ("magnitude", "2:4", "int4", "t5"),
    ("wanda", "unstructured", "int4", "bart"),
    ("sparsegpt", "2:4", "int4-default", "llama"),
]


@pytest.mark.parametrize(("method", "pattern", "quant", "arch"), CASES)
def test_prune_quantizes_every_kept_weight(tiny_dirs, method, pattern, quant, arch, one_thread_unless_slow):
    lm = load(str(tiny_dirs[arch]))
    default = quant.endswith("-default")
    quant = quant.removesuffix("-default")
    cfg = PruneConfig.from_settings(method, sparsity=0.5, pattern=pattern, nsamples=2, seqlen=16, quant=quant,
                                    group_size=32 if quant == "int4" and not default else None)
    result = prune(lm, cfg)
    report = result.to_dict()["quantization"]
    joint = method in ("sparsegpt", "alps")
    assert report["scheme"] == quant and report["gptq"] == (len(lm.prunable) if joint else 0)
    assert report["round_to_nearest"] == (0 if joint else len(lm.prunable))
    head = head_modules(lm.model)
    assert head and set(report["head"]["modules"]) == set(head)
    assert set(lm.quant) == {m.name for m in lm.prunable} | set(head)
    for name in head:
        assert lm.quant[name].scheme == head_scheme(lm.model.get_submodule(name).weight.shape[1])
        assert lm.quant[name].scheme.group_size in (None, 32) and lm.quant[name].scheme.bits == 8
        _check_on_grid(lm.model.get_submodule(name).weight, lm.quant[name])
    nm = cfg.nm
    for m, r in zip(lm.prunable, result.matrices, strict=True):
        w = m.weight(lm.model)
        keep = result.masks[m.name]
        _check_on_grid(w, lm.quant[m.name], keep)
        assert lm.quant[m.name].scheme == cfg.quant_for(m.in_features)
        assert not default or lm.quant[m.name].scheme.group_size == m.in_features  # 64 or 128 wide: 128 halved to fit
        assert r.pruned == int((~keep).sum()) and r.zeros == int((w == 0).sum()) >= r.pruned
        assert nm is None or check_nm(w != 0, *nm)


def test_gptq_at_sparsity_zero_and_refine_falls_back_to_rtn(tiny_dirs, one_thread_unless_slow):
    lm = load(str(tiny_dirs["llama"]))
    result = prune(lm, PruneConfig.from_settings("sparsegpt", sparsity=0.0, nsamples=2, seqlen=16, quant="int8"))
    assert result.to_dict()["quantization"]["gptq"] == len(lm.prunable)
    assert all(r.pruned == 0 for r in result.matrices)
    lm = load(str(tiny_dirs["llama"]))
    result = prune(lm, PruneConfig.from_settings("wanda", sparsity=0.5, nsamples=2, seqlen=16, quant="int4",
                                                 group_size=16, refine="swap", refine_budget=2))
    assert result.to_dict()["quantization"]["round_to_nearest"] == len(lm.prunable)
    for m in lm.prunable:
        _check_on_grid(m.weight(lm.model), lm.quant[m.name], result.masks[m.name])


# -- CLI -------------------------------------------------------------------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--quant", "int3"], "unknown --quant 'int3'"),
        (["--quant", "int4", "--group-size", "48"], "--group-size 48 does not divide in_features=64 of model.layers.0"),
        (["--group-size", "32"], "--group-size applies to quantized runs"),
    ],
)
def test_cli_bad_quant_input(tiny_dirs, tmp_path, monkeypatch, capsys, extra, fragment):
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "sparsegpt",
                         "--nsamples", "2", "--seqlen", "16", *extra, "--out", str(out))
    flat = _flat(text)
    assert code == 2 and fragment in flat and flat.startswith("error:") and flat.count("error:") == 1, text
    assert "Traceback" not in text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_quantize_then_refuse_requantizing(tiny_dirs, tmp_path, monkeypatch, capsys, one_thread_unless_slow):
    first = tmp_path / "q"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--nsamples",
                         "2", "--seqlen", "16", "--quant", "int8", "--format", "sparse", "--out", str(first))
    assert code == 0, text
    report = json.loads((first / "prune_report.json").read_text())
    assert report["config"]["quant"] == "int8" and report["quantization"]["bits"] == 8
    assert load(str(first)).quant  # the checkpoint comes back quantized
    out = tmp_path / "again"
    code, text = run_cli(monkeypatch, capsys, "prune", str(first), "--method", "magnitude", "--quant", "int4",
                         "--group-size", "32", "--out", str(out))
    flat = _flat(text)
    assert code == 2 and "already quantized (int8); prune the float checkpoint instead" in flat, text
    assert flat.count("error:") == 1 and not out.exists()
    code, text = run_cli(monkeypatch, capsys, "prune", str(first), "--method", "sparsegpt", "--nsamples", "2",
                         "--seqlen", "16", "--out", str(out))  # re-solving would move weights off the grid
    assert code == 2 and "already quantized (int8)" in _flat(text) and not out.exists()
    code, text = run_cli(monkeypatch, capsys, "prune", str(first), "--method", "magnitude", "--sparsity", "0.7",
                         "--format", "sparse", "--out", str(out))  # a mask keeps every weight on its grid
    assert code == 0, text
    again = load(str(out))
    assert set(again.quant) == set(load(str(first)).quant)


def test_cli_hf_format_says_it_stores_float(tiny_dirs, tmp_path, monkeypatch, capsys, one_thread_unless_slow):
    out = tmp_path / "hf"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["gpt2"]), "--method", "magnitude",
                         "--quant", "int4", "--group-size", "32", "--out", str(out))
    assert code == 0, text
    assert _flat(text).count("dequantized, as float32") == 1
    report = json.loads((out / "prune_report.json").read_text())
    assert any("dequantized, as float32" in w for w in report["warnings"])
    lm = load(str(out))
    assert not lm.quant  # plain float32 safetensors: the grid is there, the scales are not
