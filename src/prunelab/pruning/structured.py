"""Structured pruning: remove whole MLP neurons (and attention heads) and physically shrink the model.

Unstructured zeros need a sparse kernel to pay off; removed neurons pay off everywhere: the
result is a smaller *dense* Hugging Face model (same architecture, smaller
`intermediate_size` / head counts in its config) that `save_pretrained` writes and plain
`AutoModel*.from_pretrained` loads, and that is faster on any hardware.

**What `sparsity` means here**: the fraction of MLP neurons removed from every block (and,
with the option `target` "heads"/"both", the fraction of attention heads -- KV groups for
GQA models -- removed from every block). Every block keeps the *same* count, because a
Hugging Face config has one `intermediate_size` (per stack for BART/Whisper, one `d_ff` for
T5); counts are exact, `keep = n - round(sparsity * n)`, not rounded to a multiple of 8
(SmolLM2's 1536 at 25 % gives 1152 = 144 x 8 anyway).

**Score** (activation-aware, one calibration pass over the dense model): for neuron j of a
block, with a_j its activation (the input of the down projection, i.e. after the
nonlinearity and the gate) over all calibration tokens and w_j the down projection's
column j,

    score_j = ||a_j||_2 * ||w_j||_2  =  || a_j w_j^T ||_F,

the Frobenius norm of everything that neuron adds to the block's output on the calibration
set -- removing the lowest-scoring neurons removes the least output energy (the cross terms
between neurons are ignored). A head is scored the same way with its context vectors (the
o-projection input slice of that head) and its o-projection columns:
||A_h||_F * ||W_o[:, h]||_F (an upper bound of its output contribution); a GQA group is scored
by the sum of its query heads' scores and removed as a whole (its K/V rows and all its
query heads), so the query/KV ratio stays what the architecture needs.

Supported MLPs: llama-style gate/up/down, GPT-2 `c_fc`/`c_proj` (Conv1D), BERT
intermediate/output, BART/Whisper fc1/fc2, T5 wi(/wi_0/wi_1)/wo. Heads: only architectures
whose config states the head size independently of the hidden size (`head_dim`: llama,
Mistral, Qwen2 ...). GPT-2/BERT/BART derive the head size from `hidden / heads`, so a
model with fewer heads is not expressible in their configs; T5 shares one relative position
bias across layers, which forbids per-layer head choices. Those raise a clear error.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.registry import MethodOutput, PruneWarning

ProgressFn = Callable[[str, int, int], None]

_IN_SIDE = ("gate", "up")  # neuron = output row
_OUT_SIDE = ("down",)  # neuron = input column
# config attributes that hold the MLP width (BART/Whisper use encoder_/decoder_ffn_dim, handled apart)
_MLP_ATTRS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim")
TARGETS = ("mlp", "heads", "both")


@dataclass(frozen=True)
class StructuredOptions:
    """What structured pruning removes: MLP neurons (`mlp`), KV-head groups (`heads`) or both."""

    target: str = "mlp"

    def __post_init__(self) -> None:
        _check_target(self.target)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ConfigError(f"unknown structured target '{target}': use mlp, heads or both")


@dataclass
class MlpGroup:
    stack: str
    block: int
    inputs: list[PrunableMatrix]  # gate/up: neurons are their output rows
    output: PrunableMatrix  # down: neurons are its input columns

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass
class AttnGroup:
    stack: str
    block: int
    q: PrunableMatrix
    k: PrunableMatrix
    v: PrunableMatrix
    o: PrunableMatrix


@dataclass
class StructuredPlan:
    """Which neurons / heads each block keeps, and the scores that decided it."""

    mlp_keep: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    head_keep: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # kept KV groups (or heads)
    mlp_scores: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    head_scores: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def mlp_groups(lm: LoadedModel) -> list[MlpGroup]:
    """The MLP of every block: its input-side linears (gate/up) and its down projection."""
    by_block: dict[tuple[str, int], list[PrunableMatrix]] = defaultdict(list)
    for m in lm.prunable:
        if m.block >= 0 and m.module_type in _IN_SIDE + _OUT_SIDE:
            by_block[(m.stack, m.block)].append(m)
    groups = []
    for (stack, block), ms in by_block.items():
        ins = [m for m in ms if m.module_type in _IN_SIDE]
        outs = [m for m in ms if m.module_type in _OUT_SIDE]
        if len(outs) != 1 or not ins:
            raise ConfigError(f"block {stack}.{block}: cannot identify the MLP (need up/gate and one down linear)")
        width = outs[0].in_features
        if any(m.out_features != width for m in ins):
            raise ConfigError(f"block {stack}.{block}: up/gate widths do not match the down projection")
        groups.append(MlpGroup(stack, block, ins, outs[0]))
    if not groups:
        raise ConfigError(f"{lm.name}: no MLP (up/gate + down linears) found for structured pruning")
    return groups


def attn_groups(lm: LoadedModel) -> list[AttnGroup]:
    by_block: dict[tuple[str, int], dict[str, PrunableMatrix]] = defaultdict(dict)
    for m in lm.prunable:
        if m.block >= 0 and m.module_type in ("q", "k", "v", "o"):
            by_block[(m.stack, m.block)][m.module_type] = m
    out = []
    for (stack, block), d in by_block.items():
        if set(d) != {"q", "k", "v", "o"}:
            raise ConfigError(f"block {stack}.{block}: attention is not separate q/k/v/o linears; "
                              "use --structured-target mlp")
        out.append(AttnGroup(stack, block, d["q"], d["k"], d["v"], d["o"]))
    return out


def _head_layout(lm: LoadedModel) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) for architectures whose config can express fewer heads."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if lm.family != "decoder" or head_dim is None or heads is None or not hasattr(cfg, "num_key_value_heads"):
        raise ConfigError(
            f"head pruning needs a config with an explicit head_dim and num_key_value_heads (llama-style); "
            f"{getattr(cfg, 'model_type', '?')} derives its head size from hidden_size: use --structured-target mlp"
        )
    return int(heads), int(kv), int(head_dim)


def _n_keep(n: int, fraction: float) -> int:
    keep = n - int(round(fraction * n))
    if keep < 1:
        raise ConfigError(f"structured sparsity {fraction} would remove all {n} units: use a smaller --sparsity")
    return keep


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def collect_scores(
    lm: LoadedModel, calib: list[dict[str, torch.Tensor]], *, mlp: bool, heads: bool,
    progress: ProgressFn | None = None,
) -> StructuredPlan:
    """One pass of the calibration set through the dense model; per-unit activation norms via hooks."""
    model = lm.model
    plan = StructuredPlan()
    sq: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(dim=0)
            sq[name] = sq[name] + s if name in sq else s
        return hook

    targets: list[PrunableMatrix] = []
    if mlp:
        targets += [g.output for g in mlp_groups(lm)]
    if heads:
        targets += [g.o for g in attn_groups(lm)]
    for pm in targets:
        hooks.append(pm.module(model).register_forward_pre_hook(make_hook(pm.name)))
    try:
        with torch.no_grad():
            for i, sample in enumerate(calib):
                model(**sample)
                if progress:
                    progress("structured: activation norms", i + 1, len(calib))
    finally:
        for h in hooks:
            h.remove()
    if mlp:
        for g in mlp_groups(lm):
            act = sq[g.output.name].sqrt().float()
            col = g.output.weight(model).detach().float().norm(dim=0)  # (out, in) → per input column
            plan.mlp_scores[(g.stack, g.block)] = act * col
    if heads:
        n_heads, n_kv, hd = _head_layout(lm)
        for g in attn_groups(lm):
            act = sq[g.o.name].reshape(n_heads, hd).sum(dim=1).sqrt().float()
            w = g.o.weight(model).detach().float().reshape(g.o.out_features, n_heads, hd)
            per_head = act * w.pow(2).sum(dim=(0, 2)).sqrt()
            plan.head_scores[(g.stack, g.block)] = per_head.reshape(n_kv, n_heads // n_kv).sum(dim=1)
    return plan


def choose(plan: StructuredPlan, fraction: float) -> StructuredPlan:
    """Keep the same number of top-scoring units in every block (sorted indices; ties broken by index)."""
    for key, s in plan.mlp_scores.items():
        k = _n_keep(s.numel(), fraction)
        plan.mlp_keep[key] = torch.sort(torch.topk(s, k, sorted=True, largest=True).indices).values
    for key, s in plan.head_scores.items():
        k = _n_keep(s.numel(), fraction)
        plan.head_keep[key] = torch.sort(torch.topk(s, k, sorted=True, largest=True).indices).values
    return plan


# ----------------------------------------------------------------------------------------------
# Slicing
# ----------------------------------------------------------------------------------------------


def _slice_module(model: nn.Module, pm: PrunableMatrix, *, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> None:
    """Keep logical (out, in) rows and/or columns of a Linear or Conv1D, resizing it in place."""
    mod = pm.module(model)
    w = pm.weight(model).detach()  # (out, in) view
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    new_out, new_in = w.shape
    bias = getattr(mod, "bias", None)
    if pm.transposed:  # Conv1D: weight (in, out), attributes nf (out) and nx (in)
        mod.weight = nn.Parameter(w.t().contiguous(), requires_grad=mod.weight.requires_grad)
        mod.nf = new_out
        if hasattr(mod, "nx"):
            mod.nx = new_in
    else:
        mod.weight = nn.Parameter(w.contiguous(), requires_grad=mod.weight.requires_grad)
        mod.in_features, mod.out_features = new_in, new_out
    if bias is not None and rows is not None:
        mod.bias = nn.Parameter(bias.detach().index_select(0, rows).contiguous(), requires_grad=bias.requires_grad)


def _uniform(attr: str, widths: set[int]) -> int:
    if len(widths) != 1:
        raise ConfigError(f"{attr} must be uniform but the blocks kept {sorted(widths)} neurons")
    return next(iter(widths))


def _set_mlp_config(lm: LoadedModel, widths: dict[str, set[int]], old: dict[str, set[int]]) -> list[str]:
    """Write the new MLP width into the config attribute(s) the architecture reads it from."""
    cfg = lm.config
    if hasattr(cfg, "encoder_ffn_dim") or hasattr(cfg, "decoder_ffn_dim"):  # BART, Whisper: one per stack
        changed = []
        for stack, w in widths.items():
            attr = f"{stack}_ffn_dim"
            if hasattr(cfg, attr):
                setattr(cfg, attr, _uniform(attr, w))
                changed.append(attr)
        return changed
    olds = set().union(*old.values())
    news = set().union(*widths.values())
    for attr in _MLP_ATTRS:
        if not hasattr(cfg, attr):
            continue
        cur = getattr(cfg, attr)
        if cur is None and attr == "n_inner":  # GPT-2: None means 4 * n_embd
            cur = 4 * cfg.n_embd
        if cur in olds:
            setattr(cfg, attr, _uniform(attr, news))
            return [attr]
    raise ConfigError(f"{getattr(cfg, 'model_type', '?')}: no config attribute holds the MLP width "
                      f"(looked for {', '.join(_MLP_ATTRS)})")


def apply_plan(lm: LoadedModel, plan: StructuredPlan) -> dict[str, Any]:
    """Slice the matrices, update the config and `lm.prunable`; return a report."""
    from prunelab.models import find_prunable

    model = lm.model
    params_before = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {"params_before": params_before}
    if plan.mlp_keep:
        widths: dict[str, set[int]] = defaultdict(set)
        old: dict[str, set[int]] = defaultdict(set)
        for g in mlp_groups(lm):
            keep = plan.mlp_keep[(g.stack, g.block)]
            old[g.stack].add(g.width)
            for pm in g.inputs:
                _slice_module(model, pm, rows=keep)
            _slice_module(model, g.output, cols=keep)
            widths[g.stack].add(int(keep.numel()))
        report["mlp_config"] = _set_mlp_config(lm, widths, old)
        report["mlp_width"] = {s: sorted(w) for s, w in widths.items()}
    if plan.head_keep:
        n_heads, n_kv, hd = _head_layout(lm)
        per_group = n_heads // n_kv
        kept_groups = set()
        for g in attn_groups(lm):
            keep_kv = plan.head_keep[(g.stack, g.block)]
            kept_groups.add(int(keep_kv.numel()))
            kv_rows = (keep_kv.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
            q_heads = (keep_kv.unsqueeze(1) * per_group + torch.arange(per_group)).reshape(-1)
            q_rows = (q_heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
            _slice_module(model, g.q, rows=q_rows)
            _slice_module(model, g.k, rows=kv_rows)
            _slice_module(model, g.v, rows=kv_rows)
            _slice_module(model, g.o, cols=q_rows)
        (new_kv,) = kept_groups
        cfg = lm.config
        cfg.head_dim = hd
        cfg.num_key_value_heads = new_kv
        cfg.num_attention_heads = new_kv * per_group
        for mod in model.modules():  # attention modules cache these at construction
            if hasattr(mod, "num_key_value_groups") and hasattr(mod, "head_dim"):
                if hasattr(mod, "num_heads"):
                    mod.num_heads = cfg.num_attention_heads
                if hasattr(mod, "num_key_value_heads"):
                    mod.num_key_value_heads = new_kv
        report["heads"] = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": new_kv,
                           "head_dim": hd}
    lm.prunable[:] = find_prunable(model, lm.family)
    report["params_after"] = sum(p.numel() for p in model.parameters())
    report["params_removed"] = params_before - report["params_after"]
    return report


def expected_params_removed(lm: LoadedModel, fraction: float, target: str = "mlp") -> int:
    """Parameters a structured prune of `fraction` will remove (weights + biases), computed from shapes alone."""
    total = 0
    if target in ("mlp", "both"):
        for g in mlp_groups(lm):
            removed = g.width - _n_keep(g.width, fraction)
            for pm in g.inputs:
                bias = getattr(pm.module(lm.model), "bias", None)
                total += removed * (pm.in_features + (1 if bias is not None else 0))
            total += removed * g.output.out_features
    if target in ("heads", "both"):
        n_heads, n_kv, hd = _head_layout(lm)
        removed_kv = n_kv - _n_keep(n_kv, fraction)
        removed_q = removed_kv * (n_heads // n_kv)
        for g in attn_groups(lm):
            for pm, n in ((g.q, removed_q), (g.k, removed_kv), (g.v, removed_kv)):
                bias = getattr(pm.module(lm.model), "bias", None)
                total += n * hd * (pm.in_features + (1 if bias is not None else 0))
            total += removed_q * hd * g.o.out_features
    return total


def structured_prune(
    lm: LoadedModel, fraction: float, calib: list[dict[str, torch.Tensor]], *, target: str = "mlp",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score, choose and slice: `lm.model` becomes a smaller dense model in place. Returns a report."""
    _check_target(target)
    if not calib:
        raise ConfigError("structured pruning needs calibration inputs (activation-aware scores)")
    mlp, heads = target in ("mlp", "both"), target in ("heads", "both")
    if heads:
        _head_layout(lm)  # fail before the calibration pass
    plan = choose(collect_scores(lm, calib, mlp=mlp, heads=heads, progress=progress), fraction)
    report = apply_plan(lm, plan)
    report.update({"target": target, "fraction": fraction,
                   "score": "||activation||_2 * ||down/o column||_2 per neuron (per KV group for heads)"})
    return report


def prune_structured(
    lm: LoadedModel, config: Any, calib: list[dict[str, torch.Tensor]] | None, progress: ProgressFn | None = None
) -> MethodOutput:
    """Registry entry (`--method structured`): shrink the model; masks describe the *new* matrices (all kept).

    The model's matrices change shape, so `lm.prunable` is refreshed in place and the
    returned masks have the new shapes. What was removed (parameters before/after, new
    widths/head counts) is the `structured` section of the result's `extra`.
    """
    report = structured_prune(lm, float(config.sparsity), calib or [], target=config.options.target,
                              progress=progress)
    warnings.warn(
        f"structured: removed {report['params_removed']} parameters "
        f"({report['params_before']} -> {report['params_after']}); the model is now smaller and dense",
        PruneWarning, stacklevel=2,
    )
    masks = {m.name: torch.ones(m.out_features, m.in_features, dtype=torch.bool) for m in lm.prunable}
    return MethodOutput(masks, {"structured": report})
