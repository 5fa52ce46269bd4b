"""Quantized sparse checkpoints (issue 14, item 2): integers + scales, round trips bit for bit.

Every tiny architecture, int8 and int4, unstructured and 2:4: save → load gives the same
dequantized weights, the same integers and the same scales (`lm.quant` restored), the encoding
the exact byte counts say is smallest, and `prunelab size` reports bits and bytes per kept weight.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.errors import CheckpointError
from prunelab.models import TINY_ARCHS, byte_tokenizer, tiny_model, wrap_model
from prunelab.pruning import PruneConfig
from prunelab.pruning.quantize import quantize_remaining
from prunelab.quant import QuantInfo, QuantScheme, quantize_rtn
from prunelab.storage import INDEX_NAME, iter_tensors, load, save, size_report
from prunelab.storage.api import QuantizedAsFloatWarning
from prunelab.storage.checkpoint import iter_encoded
from prunelab.storage.encodings import encode_quantized

SCHEMES = {"int8": None, "int4": 32}


def _keep(w: torch.Tensor, pattern: str, gen: torch.Generator) -> torch.Tensor:
    if pattern == "2:4":
        scores = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=gen)
        drop = scores.argsort(-1)[..., :2]
        return torch.ones_like(scores, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
    return torch.rand(w.shape, generator=gen) >= int(pattern[1:]) / 100


def _quantized_lm(arch: str, pattern: str, quant: str, seed: int = 0):
    """A tiny model with random masks, its kept weights and head quantized (round-to-nearest)."""
    lm = wrap_model(tiny_model(arch, seed=seed), tokenizer=byte_tokenizer())
    gen = torch.Generator().manual_seed(seed + 1)
    masks = {m.name: _keep(m.weight(lm.model), pattern, gen) for m in lm.prunable}
    config = PruneConfig(method="magnitude", quant=quant, group_size=SCHEMES[quant])
    quantize_remaining(lm, config, masks)
    return lm


def _ints(lm, name: str) -> torch.Tensor:
    mod = lm.model.get_submodule(name)
    w = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight
    return lm.quant[name].ints(w)


@pytest.mark.parametrize("pattern", ["u50", "u90", "2:4"])
@pytest.mark.parametrize("quant", list(SCHEMES))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantized_round_trip_is_exact(tmp_path: Path, arch: str, quant: str, pattern: str) -> None:
    lm = _quantized_lm(arch, pattern, quant)
    out = save(lm, tmp_path / "ck", format="sparse")
    back = load(out)
    assert set(back.quant) == set(lm.quant)
    for name, info in lm.quant.items():
        assert back.quant[name].scheme == info.scheme
        assert torch.equal(back.quant[name].scales, info.scales) and back.quant[name].scales.dtype == torch.float32
        assert (info.zeros is None) == (info.scheme.bits == 8)  # int4 is asymmetric: scale + zero point
        assert info.zeros is None or torch.equal(back.quant[name].zeros, info.zeros)
        assert torch.equal(_ints(back, name), _ints(lm, name))
    before, after = lm.model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name

    index = json.loads((out / INDEX_NAME).read_text())["tensors"]
    prunable = {m.param_name: m for m in lm.prunable}
    want = {"u50": "bitmask", "2:4": "nm", "u90": "csr"}[pattern]
    for name, e in index.items():
        if "alias_of" in e or name not in prunable:
            continue
        p = e["params"]
        assert p["quant"] == quant and p["bits"] == int(quant[3:]) and p["group_size"] == SCHEMES[quant]
        assert p["transposed"] == prunable[name].transposed
        n, nnz = math.prod(e["shape"]), e["nnz"]
        scale_bytes = math.prod(e["components"]["scales"]["shape"]) * (4 if quant == "int8" else 5)  # + uint8 zero
        assert ("zeros" in e["components"]) == (quant == "int4")
        bitmask = math.ceil(n / 8) + (nnz if quant == "int8" else math.ceil(nnz / 2)) + scale_bytes
        assert e["stored_bytes"] <= bitmask  # smallest by exact byte count: never above the bitmask's
        if pattern == "2:4":  # 3 bits per group of 4 vs a bit each: nm, unless rounding to 0 thinned the rows
            groups = n // 4
            nm_bytes = groups * 2 * (1 if quant == "int8" else 0.5) + math.ceil(groups * 3 / 8) + scale_bytes
            assert e["stored_bytes"] <= nm_bytes and e["encoding"] in ("nm", "bitmask")
            assert quant == "int4" or e["encoding"] == "nm"
        elif pattern == "u50":  # at 90 % CSR and bitmask are within bytes of each other on 64-wide matrices
            assert e["encoding"] == want, (name, e["encoding"])
        assert e["encoding"] != "bitmask" or e["stored_bytes"] == bitmask
        assert (p.get("bitorder") == "little") == (e["encoding"] == "bitmask")
        assert e["components"]["scales"]["dtype"] == "float32"
        vals = e["components"]["values"]
        assert vals["dtype"] == ("int8" if quant == "int8" else "uint8")


def test_encoded_components_layout_and_byte_counts() -> None:
    """Bitmask bit i%8 of byte i//8 (little), int4 packed low nibble first, exact stored bytes."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen) * (torch.rand(16, 64, generator=gen) > 0.5)
    q, info = quantize_rtn(w, QuantScheme(4, 32))
    enc = encode_quantized(info.dequantize(q), "w", info)
    assert enc.encoding == "bitmask" and enc.params["bitorder"] == "little"
    flat = q.reshape(-1)
    mask = enc.components["mask"].numpy()
    bits = (mask[np.arange(flat.numel()) // 8] >> (np.arange(flat.numel()) % 8)) & 1
    assert np.array_equal(bits.astype(bool), (flat != 0).numpy())
    nz = flat[flat != 0]
    packed = enc.components["values"]
    assert torch.equal(((packed.to(torch.int16) & 0xF) ^ 8) - 8, nz[0::2].to(torch.int16))
    n, nnz = flat.numel(), nz.numel()
    assert enc.stored_bytes == math.ceil(n / 8) + math.ceil(nnz / 2) + 16 * 2 * (4 + 1)  # scales + zero points
    assert torch.equal(enc.to_ints(), q) and torch.equal(enc.to_dense(), info.dequantize(q))
    assert torch.equal(enc.quant_info().scales, info.scales) and torch.equal(enc.quant_info().zeros, info.zeros)


def test_dense_quantized_head_and_smallest_encoding_wins() -> None:
    w = torch.randn(8, 32)
    q, info = quantize_rtn(w, QuantScheme(8, None))
    enc = encode_quantized(info.dequantize(q), "head", info)
    assert enc.encoding == "dense" and enc.components["data"].dtype == torch.int8
    assert enc.stored_bytes == 8 * 32 + 8 * 4 and torch.equal(enc.to_ints(), q)
    q4, info4 = quantize_rtn(torch.randn(8, 33 * 2), QuantScheme(4, 33))
    enc4 = encode_quantized(info4.dequantize(q4), "odd", info4)
    assert enc4.encoding in ("dense", "bitmask") and torch.equal(enc4.to_ints(), q4)


def test_weights_off_the_grid_are_refused() -> None:
    w = torch.randn(4, 32)
    q, info = quantize_rtn(w, QuantScheme(8, None))
    moved = info.dequantize(q)
    moved[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="not on their int8 grid"):
        encode_quantized(moved, "layer.w", info)


def test_corrupt_quantized_components_name_the_tensor() -> None:
    w = torch.randn(4, 32) * (torch.rand(4, 32) > 0.5)
    q, info = quantize_rtn(w, QuantScheme(8, None))
    enc = encode_quantized(info.dequantize(q), "layer.w", info)
    enc.components["scales"] = enc.components["scales"][:2]
    with pytest.raises(CheckpointError, match="tensor layer.w: scales are"):
        enc.validate()
    enc = encode_quantized(info.dequantize(q), "layer.w", info)
    enc.components["values"] = enc.components["values"].clone()
    enc.components["values"][0] = -128
    with pytest.raises(CheckpointError, match="-128"):
        enc.to_dense()


def test_size_report_and_iter_tensors(tmp_path: Path) -> None:
    lm = _quantized_lm("llama", "2:4", "int4")
    out = save(lm, tmp_path / "ck", format="sparse")
    rep = size_report(out)
    rows = {r["name"]: r for r in rep["tensors"]}
    row = rows[lm.prunable[0].param_name]
    assert row["bits"] == 4 and row["quant"] == "int4/g32" and row["encoding"].startswith("nm(2:4) int4/g32")
    assert row["bytes_per_kept_weight"] == pytest.approx(row["stored_bytes"] / row["nnz"])
    assert row["stored_bytes"] <= row["bitmask_bound_bytes"] + 1
    # per kept weight: 0.5 (4 bits) + 0.1875 (3 bits per 2 kept) + 0.25 (a float32 scale per 16 kept), a
    # little more where kept weights rounded to 0; fp32 dense would be 8 bytes per kept weight at 2:4
    assert rep["totals"]["pruned"]["bytes_per_kept_weight"] < 1.2
    head = rows["lm_head.weight"] if "lm_head.weight" in rows else rows["model.embed_tokens.weight"]
    assert head["quant"] == "int8/g32" and head["bits"] == 8  # int8 per row and GGUF block of 32 (Q8_0 grid)
    state = lm.model.state_dict()
    for name, t in iter_tensors(out):
        assert torch.equal(t, state[name]), name
    assert all(enc.quantized == ("scales" in enc.components) for _, enc in iter_encoded(out))


def test_hf_format_writes_dequantized_float_with_one_warning(tmp_path: Path) -> None:
    lm = _quantized_lm("gpt2", "u50", "int8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = save(lm, tmp_path / "hf", format="hf")
    notes = [w for w in caught if issubclass(w.category, QuantizedAsFloatWarning)]
    assert len(notes) == 1 and "dequantized, as float32" in str(notes[0].message)
    back = load(out)
    assert not back.quant
    for name, t in lm.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], t), name


def test_int4_zero_points_and_symmetric_int4_without_them() -> None:
    """int4 is a scale and a zero point per group: the levels d = ((q + z) & 15) - z of the stored nibbles
    q reproduce the weights, 0 stays pruned; an int4 tensor without `zeros` (symmetric) reads as z = 8."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.rand(6, 64, generator=gen) + 0.1) * (torch.rand(6, 64, generator=gen) > 0.5)  # positive: z = 0
    q, info = quantize_rtn(w, QuantScheme(4, 32))
    assert info.zeros is not None and info.zeros.dtype == torch.uint8 and int(info.zeros.max()) == 0
    assert int(info.levels(q).max()) == 15 and torch.equal(q == 0, w == 0)  # all 16 levels on one side of 0
    enc = encode_quantized(info.dequantize(q), "pos", info)
    assert torch.equal(enc.to_dense(), info.dequantize(q)) and torch.equal(enc.components["zeros"], info.zeros)
    sym = QuantInfo(QuantScheme(4, 32), info.scales)  # no zero points: the symmetric grid [-8, 7]
    qs = torch.randint(-8, 8, (6, 64), generator=gen, dtype=torch.int8)
    enc = encode_quantized(sym.dequantize(qs), "sym", sym)
    assert "zeros" not in enc.components and torch.equal(enc.to_ints(), qs)
    assert torch.equal(enc.to_dense(), qs.float() * sym.expanded_scales(64))
    bad = encode_quantized(info.dequantize(q), "pos", info)
    bad.components["zeros"] = bad.components["zeros"] + 16
    with pytest.raises(CheckpointError, match="tensor pos: zeros are"):
        bad.validate()
