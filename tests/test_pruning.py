"""Pruning engine: exact sparsity and N:M on every tiny architecture, reloads, references.

References used: torch.nn.utils.prune (global magnitude), a naive "one full forward per
matrix" implementation of Wanda/SparseGPT (checks the block-by-block runner), and the
layer-wise reconstruction error ‖WX − ŴX‖ (checks SparseGPT's weight update).
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.pruning import PruneConfig, PruningError, prune, save_pruned
from prunelab.pruning.patterns import (
    check_nm,
    lowest_k_magnitude_masks,
    lowest_k_mask,
    nm_mask,
    rowwise_mask,
    select_mask,
    target_count,
)
from prunelab.pruning.sparsegpt import HessianStats, sparsegpt_matrix
from prunelab.pruning.wanda import NormStats
from prunelab.storage import load

ARCHS = ("gpt2", "llama", "bert", "bart", "t5")
METHODS = ("magnitude", "magnitude-layer", "wanda", "sparsegpt")
AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModelForMaskedLM",
        "bart": "AutoModelForSeq2SeqLM", "t5": "AutoModelForSeq2SeqLM"}
SMALL = {"nsamples": 4, "seqlen": 32}


def _forward(model: torch.nn.Module, arch: str) -> torch.Tensor:
    ids = torch.arange(5, 25).unsqueeze(0)
    kw = {"decoder_input_ids": ids[:, :8]} if arch in ("bart", "t5") else {}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ---------------------------------------------------------------------------------------------
# Mask selection
# ---------------------------------------------------------------------------------------------


def test_lowest_k_exact_with_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 1.0])
    keep = lowest_k_mask(scores, 2)
    assert keep.tolist() == [True, False, False, True, True, True]  # ties: lower index pruned first
    assert (~lowest_k_mask(torch.zeros(100), 37)).sum() == 37
    assert lowest_k_mask(scores, 0).all() and not lowest_k_mask(scores, 6).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_global_selection_equals_concatenated_lowest_k(dtype):
    """The radix select over several tensors == lowest_k_mask on the concatenation, ties included."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.0, 1e-3, -1e-3, 0.02, -0.5, 3.0])  # heavy ties, signs, zeros
    tensors = [
        (torch.randn(37, 11, generator=g) * 0.05).to(dtype),
        levels[torch.randint(0, 6, (400,), generator=g)].to(dtype),
        (torch.randn(5, 3, 7, generator=g) * 10.0 ** torch.randint(-30, 3, (5, 3, 7), generator=g)).to(dtype),
    ]
    tensors[0].view(-1)[::5] = levels[torch.randint(0, 6, (tensors[0].numel() // 5 + 1,), generator=g)].to(dtype)
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])  # ties now span tensors too
    n = flat.numel()
    for k in {0, 1, 2, n // 3, n // 2, int((flat == 0).sum()), int((flat <= 1e-3).sum()), n - 1, n}:
        ref = lowest_k_mask(flat, k)
        got = torch.cat([m.reshape(-1) for m in lowest_k_magnitude_masks(tensors, k)])
        assert torch.equal(got, ref), k
        assert (~got).sum() == k


def test_rowwise_exact_and_balanced():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 13, generator=g)
    for k in (0, 1, 6, 7, 45, 90, 91):
        keep = rowwise_mask(scores, k)
        assert int((~keep).sum()) == k
        per_row = (~keep).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
        # within each row the pruned entries are that row's lowest scores
        for r in range(7):
            pruned = scores[r][~keep[r]]
            kept = scores[r][keep[r]]
            if len(pruned) and len(kept):
                assert pruned.max() <= kept.min()


def test_nm_mask_groups_and_tail():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 70, generator=g)
    keep = nm_mask(scores, 2, 4)
    groups = (~keep[:, :68]).reshape(5, 17, 4).sum(-1)
    assert (groups == 2).all()
    assert ((~keep[:, 68:]).sum(1) == 1).all()  # tail of 2 → round(2·2/4) = 1
    assert check_nm(keep, 2, 4)
    keep48 = nm_mask(scores[:, :64], 4, 8)
    assert ((~keep48).reshape(5, 8, 8).sum(-1) == 4).all()


def test_select_mask_rounding_matches_torch():
    assert target_count(0.5, 5) == round(2.5) == 2
    for s in (0.1, 0.5, 0.9, 0.95, 0.99):
        keep = select_mask(torch.rand(33, 17), s, None, rowwise=False)
        assert int((~keep).sum()) == round(s * 33 * 17)


# ---------------------------------------------------------------------------------------------
# Every method × pattern × architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_method_pattern_arch(tiny_dirs, tmp_path, arch, method, pattern):
    import transformers

    lm = load(str(tiny_dirs[arch]))
    dense = {m.name: m.weight(lm.model).detach().clone() for m in lm.prunable}
    result = prune(lm, PruneConfig(method=method, sparsity=0.5, pattern=pattern, **SMALL))
    total_expected = 0
    for m in lm.prunable:
        w = m.weight(lm.model)
        keep = result.masks[m.name]
        assert keep.shape == w.shape and keep.dtype == torch.bool
        assert (w[~keep] == 0).all()
        if pattern == "2:4":
            assert check_nm(keep, 2, 4) and int((~keep).sum()) == w.numel() // 2
        elif method != "magnitude":
            assert int((~keep).sum()) == round(0.5 * w.numel()), m.name
        total_expected += w.numel()
        if method != "sparsegpt":  # only SparseGPT updates the kept weights
            assert torch.equal(w[keep], dense[m.name][keep])
    assert result.prunable_params == total_expected
    assert result.prunable_zeros == round(0.5 * total_expected)
    assert result.sparsity_total < result.sparsity_prunable
    rep = {r.name: r for r in result.matrices}
    assert all(r.requested == 0.5 for r in rep.values())
    if method != "magnitude" or pattern == "2:4":
        assert all(r.achieved == 0.5 for r in rep.values())
    logits = _forward(lm.model, arch)
    assert torch.isfinite(logits).all()
    if method in ("wanda", "sparsegpt"):
        assert result.calibration["nsamples"] == 4 and result.calibration["tokens"] == 128

    out = save_pruned(lm, result, tmp_path / "out")
    assert (out / "prune_report.json").is_file() and (out / "model.safetensors").is_file()
    reloaded = getattr(transformers, AUTO[arch]).from_pretrained(str(out)).eval()
    for m in lm.prunable:
        assert torch.equal(m.weight(reloaded), m.weight(lm.model)), m.name
    assert torch.allclose(_forward(reloaded, arch), logits, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.9, 0.95, 0.99])
def test_any_sparsity_exact(tiny_dirs, sparsity):
    for method in ("magnitude-layer", "wanda"):
        lm = load(str(tiny_dirs["llama"]))
        result = prune(lm, PruneConfig(method=method, sparsity=sparsity, **SMALL))
        for r in result.matrices:
            assert r.pruned == round(sparsity * r.numel)
        assert torch.isfinite(_forward(lm.model, "llama")).all()


def test_deterministic_given_seed(tiny_dirs):
    def masks(seed):
        lm = load(str(tiny_dirs["bart"]))
        return prune(lm, PruneConfig(method="wanda", sparsity=0.6, seed=seed, **SMALL)).masks

    a, b, c = masks(0), masks(0), masks(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_global_magnitude_equals_torch_prune(tiny_dirs, arch, amount):
    import torch.nn.utils.prune as tprune

    lm = load(str(tiny_dirs[arch]))
    ref_model = copy.deepcopy(lm.model)
    params = [(ref_model.get_submodule(m.name), "weight") for m in lm.prunable]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    result = prune(lm, PruneConfig(method="magnitude", sparsity=amount))
    for m, (module, _) in zip(lm.prunable, params, strict=True):
        ref = module.weight_mask.bool()
        ref = ref.t() if m.transposed else ref
        assert torch.equal(result.masks[m.name], ref), m.name
    # global: per-matrix sparsities differ (that is the point of the method)
    assert len({r.pruned / r.numel for r in result.matrices}) > 1


def _naive_reference(lm, calib, method: str, sparsity: float, nm):
    """One full model forward per matrix, in module order, pruning as we go (no block replay)."""
    batch = {k: torch.cat([c[k] for c in calib]) for k in calib[0]}
    model = lm.model
    masks = {}
    for m in lm.prunable:
        seen = []
        h = m.module(model).register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].detach()))
        with torch.no_grad():
            model(**batch, **({"use_cache": False} if lm.family != "encoder" else {}))
        h.remove()
        x = seen[0].reshape(-1, seen[0].shape[-1])
        w = m.weight(model)
        with torch.no_grad():
            if method == "wanda":
                st = NormStats(m.in_features)
                st.add(x)
                keep = select_mask(w.abs() * st.norms(), sparsity, nm, rowwise=True)
                w.masked_fill_(~keep, 0)
            else:
                st = HessianStats(m.in_features)
                st.add(x)
                new, keep = sparsegpt_matrix(w, st.hessian(), sparsity, nm)
                w.copy_(new)
        masks[m.name] = keep
    return masks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_runner_matches_naive_reference(tiny_dirs, arch, method):
    from prunelab.data.calibration import calibration_inputs

    config = PruneConfig(method=method, sparsity=0.5, nsamples=3, seqlen=24, seed=3)
    lm = load(str(tiny_dirs[arch]))
    ref_lm = load(str(tiny_dirs[arch]))
    calib = calibration_inputs(lm, config)
    result = prune(lm, config)
    ref_masks = _naive_reference(ref_lm, calib, method, 0.5, None)
    for m in lm.prunable:
        agree = (result.masks[m.name] == ref_masks[m.name]).float().mean()
        assert agree > 0.999, (m.name, float(agree))
        assert torch.allclose(m.weight(lm.model), m.weight(ref_lm.model), atol=1e-4, rtol=1e-3), m.name


def test_chunked_two_pass_mode(tiny_dirs, monkeypatch):
    """A calibration set too large for one batch runs in chunks (statistics pass, prune, output pass)."""
    import prunelab.pruning.sequential as seq

    calls = []
    real = seq.plan_chunks
    monkeypatch.setattr(seq, "plan_chunks", lambda lm, calib, budget_bytes=None: calls.append(1) or 2)
    for arch in ("gpt2", "t5"):
        lm = load(str(tiny_dirs[arch]))
        result = prune(lm, PruneConfig(method="sparsegpt", sparsity=0.5, **SMALL))
        assert all(r.pruned == round(0.5 * r.numel) for r in result.matrices)
        assert torch.isfinite(_forward(lm.model, arch)).all()
    assert calls and real is not None


def _layer_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(96, 96, generator=g) / 10 + torch.eye(96)
    scale = 0.2 + 2.8 * torch.rand(96, generator=g)
    X = torch.randn(1024, 96, generator=g) @ mix * scale  # correlated features, uneven scales
    W = torch.randn(48, 96, generator=g)
    return W, X


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstruction_beats_magnitude_and_wanda(nm):
    W, X = _layer_problem()
    hs = HessianStats(96)
    hs.add(X)
    ns = NormStats(96)
    ns.add(X)
    sgpt, keep = sparsegpt_matrix(W, hs.hessian(), 0.5, nm, blocksize=32)
    mag = W * select_mask(W.abs(), 0.5, nm, rowwise=False)
    wanda = W * select_mask(W.abs() * ns.norms(), 0.5, nm, rowwise=True)

    def err(What):
        return float(torch.linalg.norm((W - What) @ X.t()))

    assert int((sgpt == 0).sum()) == W.numel() // 2 and int((~keep).sum()) == W.numel() // 2
    assert err(sgpt) < err(wanda) < err(mag)


def test_sparsegpt_exact_count_odd_shapes():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(9, 200, generator=g)
    X = torch.randn(300, 200, generator=g)
    H = X.t() @ X / 300
    for s in (0.1, 0.37, 0.9):
        _, keep = sparsegpt_matrix(W, H, s, blocksize=128)
        assert int((~keep).sum()) == round(s * W.numel())
    _, keep = sparsegpt_matrix(W[:, :70], H[:70, :70], 0.5, (2, 4), blocksize=128)
    assert check_nm(keep, 2, 4)


def test_sparsegpt_raises_dampening_then_fails():
    W = torch.randn(8, 128)
    H = torch.eye(128)
    H[5, 5] = -0.5  # indefinite: 1 % dampening is not enough, 100 % is
    with pytest.warns(UserWarning, match="dampening raised"):
        new, keep = sparsegpt_matrix(W, H, 0.5, name="layer")
    assert torch.isfinite(new).all() and int((~keep).sum()) == 512
    H[5, 5] = -1e6
    with pytest.raises(PruningError, match="still singular"):
        sparsegpt_matrix(W, H, 0.5, name="layer")
    H = torch.eye(128)
    H[3, 3] = float("nan")
    with pytest.raises(PruningError):
        sparsegpt_matrix(W, H, 0.5, name="layer")


def test_dampening_warning_lands_in_result(tiny_dirs, monkeypatch):
    import prunelab.pruning.sparsegpt as sg

    real = sg.HessianStats.hessian

    def indefinite(self):
        H = real(self)
        H[0, 0] = -float(torch.diagonal(H).mean()) * 0.5
        return H

    monkeypatch.setattr(sg.HessianStats, "hessian", indefinite)
    lm = load(str(tiny_dirs["llama"]))
    result = prune(lm, PruneConfig(method="sparsegpt", sparsity=0.5, **SMALL))
    assert result.warnings and all("dampening raised" in w for w in result.warnings)
    assert all(r.pruned == round(0.5 * r.numel) for r in result.matrices)


# ---------------------------------------------------------------------------------------------
# OWL and bad input
# ---------------------------------------------------------------------------------------------


def test_owl_block_sparsities(tiny_dirs):
    from prunelab.pruning.owl import owl_sparsities

    s = owl_sparsities({("decoder", 0): 0.01, ("decoder", 1): 0.03, ("decoder", 2): 0.02}, 0.6, 0.08)
    assert s[("decoder", 0)] == pytest.approx(0.68) and s[("decoder", 1)] == pytest.approx(0.52)
    assert sum(s.values()) / 3 == pytest.approx(0.6)
    lm = load(str(tiny_dirs["llama"]))
    result = prune(lm, PruneConfig(method="wanda", sparsity=0.5, owl=True, **SMALL))
    by_block = {}
    for r in result.matrices:
        by_block.setdefault(r.block, set()).add(round(r.requested, 2))
    assert len(by_block) == 2 and all(len(v) == 1 for v in by_block.values())
    assert {v.pop() for v in by_block.values()} == {0.42, 0.58}  # two blocks: s ± λ
    assert torch.isfinite(_forward(lm.model, "llama")).all()


def test_bad_input(tiny_dirs):
    from prunelab.errors import ConfigError, PrunelabError

    for kwargs in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"pattern": "4:4"}, {"pattern": "5:4"},
                   {"pattern": "2-4"}, {"method": "nope"}):
        with pytest.raises(ConfigError):
            PruneConfig(**kwargs)
    lm = load(str(tiny_dirs["gpt2"]))
    with pytest.raises(ConfigError, match="--owl"):
        prune(lm, PruneConfig(method="magnitude", owl=True))
    lm.prunable = []
    with pytest.raises(PrunelabError, match="no prunable matrices"):
        prune(lm, PruneConfig(method="magnitude"))


def test_mixed_attention_layer_types_get_their_own_masks(tmp_path):
    """Sliding-window and full-attention layers receive different masks; the runner must replay each."""
    import transformers

    from prunelab.data.calibration import calibration_inputs
    from prunelab.models import byte_tokenizer

    cfg = transformers.Qwen2Config(
        vocab_size=269, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, layer_types=["full_attention", "sliding_attention"], architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "q")
    byte_tokenizer().save_pretrained(tmp_path / "q")
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=3, seqlen=24)
    lm = load(str(tmp_path / "q"))
    ref_lm = load(str(tmp_path / "q"))
    calib = calibration_inputs(lm, config)
    result = prune(lm, config)
    ref_masks = _naive_reference(ref_lm, calib, "wanda", 0.5, None)
    for m in lm.prunable:
        assert torch.equal(result.masks[m.name], ref_masks[m.name]), m.name
