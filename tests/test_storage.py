"""Sparse checkpoints: bit-exact round trips on every family, encoding choice, corruption handling."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prunelab.errors import CheckpointError, ConfigError
from prunelab.models import TINY_ARCHS, byte_tokenizer, tiny_model, wrap_model
from prunelab.storage import (
    INDEX_NAME,
    EncodedTensor,
    bounds_bytes,
    encode_tensor,
    is_sparse_checkpoint,
    iter_tensors,
    load,
    save,
    size_report,
)

PATTERNS = ("u50", "u90", "u99", "2:4")
EXPECTED_ENCODING = {"u50": "bitmask", "u99": "csr", "2:4": "nm"}


# -- helpers -------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern of a tensor (so NaN, -0.0 and dtype are compared exactly)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _keep_mask(w: torch.Tensor, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """Random mask (True = kept) in (out, in) orientation; for 2:4, 2 of every 4 inputs kept."""
    if pattern == "2:4":
        scores = torch.rand(w.shape[0], w.shape[1] // 4, 4, generator=gen)
        drop = scores.argsort(-1)[..., :2]
        keep = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(w.shape)
    sparsity = int(pattern[1:]) / 100
    return torch.rand(w.shape, generator=gen) >= sparsity


def _pruned_lm(arch: str, pattern: str, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    lm = wrap_model(model, tokenizer=byte_tokenizer())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(model)  # (out, in) view: writes reach Conv1D weights too
            w.masked_fill_(~_keep_mask(w, pattern, gen), 0.0)
    return lm


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    ids = torch.tensor([[1, 40, 77, 90, 120, 33, 250, 7, 2]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("bart", "t5"):
        kwargs["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        return model(**kwargs).logits


def _tied(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_bit_exact(tmp_path: Path, arch: str, pattern: str) -> None:
    lm = _pruned_lm(arch, pattern)
    out = save(lm, tmp_path / "ck", format="sparse")
    loaded = load(out).model
    assert type(loaded) is type(lm.model)
    before, after = lm.model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert _same_bits(before[name], after[name]), name
    assert torch.equal(_logits(lm.model, arch), _logits(loaded, arch))
    assert _tied(loaded) == _tied(lm.model)

    index = json.loads((out / INDEX_NAME).read_text())
    prunable = {m.param_name for m in lm.prunable}
    stored = {k: e for k, e in index["tensors"].items() if "alias_of" not in e}
    assert {k for k, e in index["tensors"].items() if e.get("prunable")} == prunable
    if pattern in EXPECTED_ENCODING:
        assert {stored[k]["encoding"] for k in prunable} == {EXPECTED_ENCODING[pattern]}
    rep = size_report(out)
    assert rep["totals"]["pruned"]["stored_vs_bitmask_bound"] <= 1.0 + 1e-9


def test_round_trip_half_precision_and_dtype_override(tmp_path: Path) -> None:
    lm = _pruned_lm("llama", "u90")
    lm.model.to(torch.bfloat16)
    with torch.no_grad():  # awkward values must survive bit for bit
        w = lm.prunable[0].weight(lm.model)
        w[0, :4] = torch.tensor([float("nan"), float("inf"), -1e-40, 3.0], dtype=torch.bfloat16)
    save(lm.model, tmp_path / "bf16", format="sparse")
    loaded = load(tmp_path / "bf16", dtype=None).model
    for name, t in lm.model.state_dict().items():
        assert _same_bits(t, loaded.state_dict()[name]), name
    as_fp32 = load(tmp_path / "bf16", dtype=torch.float32).model
    for name, t in lm.model.state_dict().items():
        got = as_fp32.state_dict()[name]
        assert got.dtype == (torch.float32 if t.is_floating_point() else t.dtype)
        assert _same_bits(t.float() if t.is_floating_point() else t, got), name


def test_plain_model_writes_config_generation_config_and_flags(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    out = save(model, tmp_path / "ck", format="sparse", tokenizer=byte_tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", INDEX_NAME, "model.sparse.safetensors",
            "tokenizer.json"} <= names
    assert not any(n == "model.safetensors" for n in names)  # from_pretrained must not pick our file up
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    index = json.loads((out / INDEX_NAME).read_text())
    assert sum(bool(e.get("prunable")) for e in index["tensors"].values()) == 8
    assert index["tensors"]["lm_head.weight"] == {"alias_of": "transformer.wte.weight", "prunable": False}
    assert is_sparse_checkpoint(out)


def test_is_sparse_checkpoint_false_for_dense_dir(tiny_dirs: dict[str, Path]) -> None:
    assert not is_sparse_checkpoint(tiny_dirs["llama"])


def test_save_is_atomic_and_copies_extra_files(tmp_path: Path) -> None:
    extra = tmp_path / "prune_report.json"
    extra.write_text('{"model": "tiny"}')
    out = save(tiny_model("llama"), tmp_path / "ck", format="sparse", extra_files=[extra])
    assert (out / "prune_report.json").read_text() == '{"model": "tiny"}'
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="does not exist"):
        save(tiny_model("llama"), out, format="sparse", extra_files=[tmp_path / "missing.txt"])
    assert sorted(p.name for p in out.iterdir()) == before  # the old checkpoint is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp")]  # no debris
    with pytest.raises(ConfigError, match="overwrite"):
        bad = tmp_path / INDEX_NAME
        bad.write_text("{}")
        save(tiny_model("llama"), out, format="sparse", extra_files=[bad])


# -- encodings -----------------------------------------------------------------------------------


def _sparse(shape: tuple[int, ...], sparsity: float, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w


def _nm(shape: tuple[int, int], keep: int, m: int, axis: int = -1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    t = w if axis == -1 else w.t()
    scores = torch.rand(t.shape[0], t.shape[1] // m, m, generator=g)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argsort(-1)[..., :keep], True)
    t = t * mask.reshape(t.shape) + 0.0  # "+ 0.0" turns -0.0 into +0.0
    return t.contiguous() if axis == -1 else t.t().contiguous()


@pytest.mark.parametrize(
    ("w", "encoding", "params"),
    [
        (_sparse((256, 512), 0.0), "dense", {}),
        (_sparse((256, 512), 0.5), "bitmask", {}),
        (_sparse((256, 512), 0.99), "csr", {"index": "delta8"}),
        (_sparse((256, 200), 0.99), "csr", {"index": "abs"}),  # ≤ 256 columns: absolute uint8 columns
        (_nm((256, 512), 2, 4), "nm", {"n": 2, "m": 4, "axis": -1}),
        (_nm((256, 512), 2, 4, axis=0), "nm", {"n": 2, "m": 4, "axis": 0}),  # GPT-2 Conv1D orientation
        (_nm((128, 256), 4, 8), "nm", {"n": 4, "m": 8, "axis": -1}),
        (_nm((128, 256), 1, 4), "nm", {"n": 3, "m": 4, "axis": -1}),
    ],
)
def test_encoding_choice(w: torch.Tensor, encoding: str, params: dict) -> None:
    enc = encode_tensor(w, "w")
    assert (enc.encoding, enc.params) == (encoding, params)
    assert _same_bits(enc.to_dense(), w)


def test_encoding_sizes_match_formulas() -> None:
    w = _sparse((64, 1000), 0.5, seed=3)
    n, nnz = w.numel(), int((w != 0).sum())
    assert encode_tensor(w, encoding="bitmask").stored_bytes == math.ceil(n / 8) + 4 * nnz
    w24 = _nm((64, 1000), 2, 4)
    groups = w24.numel() // 4
    assert encode_tensor(w24).stored_bytes == groups * 2 * 4 + math.ceil(groups * 3 / 8)  # 3 bits per 2:4 group
    w99 = _sparse((64, 1000), 0.99, seed=4)
    e = encode_tensor(w99, encoding="csr", params={"index": "abs"})
    assert e.components["indices"].dtype == torch.uint16 and e.components["indptr"].dtype == torch.uint16
    assert e.stored_bytes == 6 * int((w99 != 0).sum()) + 2 * 65


def test_bitmask_bit_order_is_numpy_packbits_big_endian() -> None:
    w = torch.zeros(2, 8)
    w[0, 0] = 1.0  # element 0 → MSB of byte 0
    w[1, 7] = 2.0  # element 15 → LSB of byte 1
    enc = encode_tensor(w, encoding="bitmask")
    assert enc.components["mask"].tolist() == [0x80, 0x01]
    assert enc.components["values"].tolist() == [1.0, 2.0]


def test_csr_matches_scipy() -> None:
    import scipy.sparse as sp

    w = _sparse((300, 700), 0.97, seed=5)
    ref = sp.csr_matrix(w.numpy())
    for index in ("abs", "delta8", "delta16"):
        enc = encode_tensor(w, encoding="csr", params={"index": index})
        csr = enc.to_csr()
        assert np.array_equal(csr.crow_indices().numpy(), ref.indptr)
        assert np.array_equal(csr.col_indices().numpy(), ref.indices)
        assert np.array_equal(csr.values().numpy(), ref.data)
        assert _same_bits(enc.to_dense(), w)


@pytest.mark.parametrize("index", ["delta8", "delta16"])
def test_csr_delta_escapes(index: str) -> None:
    cols = 140_000 if index == "delta16" else 2000
    w = torch.zeros(3, cols)
    w[0, [0, 1, cols - 1]] = 1.0  # gaps 0, 0 and cols-3 (escapes)
    w[2, [300, 555, 1900]] = torch.tensor([2.0, -3.0, 4.0])  # row 1 empty; gaps 300, 254, 1344
    enc = encode_tensor(w, encoding="csr", params={"index": index})
    esc = 0xFF if index == "delta8" else 0xFFFF
    assert (enc.components["indices"].to(torch.int64) == esc).sum() > 0
    assert _same_bits(enc.to_dense(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1000,), (7, 33), (4, 6, 40), (64, 96)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.95, 1.0])
def test_every_encoding_is_lossless(dtype: torch.dtype, shape: tuple[int, ...], sparsity: float) -> None:
    w = _sparse(shape, sparsity, seed=7, dtype=dtype)
    if w.numel() > 3:
        w.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), 1e-30]).to(dtype)
    bits = w.element_size() * 8
    nnz = int((w != 0).sum())
    best = encode_tensor(w)
    assert _same_bits(best.to_dense(), w)
    assert best.stored_bytes <= math.ceil(bounds_bytes(w.numel(), nnz, bits)[0]) + 1
    forced = [("dense", {}), ("bitmask", {}), ("csr", {"index": "abs"}), ("csr", {"index": "delta8"}),
              ("csr", {"index": "delta16"})]
    for encoding, params in forced:
        enc = encode_tensor(w, encoding=encoding, params=params)
        assert _same_bits(enc.to_dense(), w), encoding
        assert best.stored_bytes <= enc.stored_bytes
        csr = enc.to_csr()  # compared component-wise: torch's own to_dense may rewrite NaN payloads
        rows = w.shape[0] if w.dim() > 1 else 1
        ref = w.reshape(rows, -1)
        r, c = np.nonzero((ref != 0).numpy())
        assert np.array_equal(csr.col_indices().numpy(), c), encoding
        assert np.array_equal(csr.crow_indices().numpy(), np.searchsorted(r, np.arange(rows + 1))), encoding
        assert _same_bits(csr.values(), ref[ref != 0]), encoding


def test_negative_zero_counts_as_zero() -> None:
    w = torch.randn(32, 64)
    keep = torch.rand(w.shape) > 0.9
    pruned = w * keep  # leaves -0.0 where negative weights were pruned
    assert (_bits(pruned) == _bits(torch.tensor(-0.0))).any()
    enc = encode_tensor(pruned)
    assert enc.nnz == int(keep.sum()) and enc.encoding != "dense"
    assert torch.equal(enc.to_dense(), pruned)  # equal as numbers; zeros come back as +0.0
    assert not (_bits(enc.to_dense()) == _bits(torch.tensor(-0.0))).any()


def test_all_zero_and_empty_tensors() -> None:
    for w in (torch.zeros(16, 32), torch.zeros(0, 5), torch.tensor(3.0), torch.zeros(5, dtype=torch.int64)):
        enc = encode_tensor(w)
        assert torch.equal(enc.to_dense(), w) and enc.to_dense().dtype == w.dtype
    assert encode_tensor(torch.zeros(16, 32)).stored_bytes == 0


# -- corruption ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny llama with a mix of encodings: 2:4 for the MLP gate/up, 90 % unstructured elsewhere."""
    lm = wrap_model(tiny_model("llama"), tokenizer=byte_tokenizer())
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            w.masked_fill_(~_keep_mask(w, "2:4" if m.module_type in ("up", "gate") else "u90", gen), 0.0)
    return save(lm, tmp_path_factory.mktemp("saved") / "ck", format="sparse")


@pytest.fixture
def ck(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(saved, dst)
    return dst


def _index(ck: Path) -> dict:
    return json.loads((ck / INDEX_NAME).read_text())


def _write_index(ck: Path, index: dict) -> None:
    (ck / INDEX_NAME).write_text(json.dumps(index))


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def _no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("model built from a corrupt checkpoint")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", boom)


def test_corrupt_saved_checkpoint_mix(saved: Path) -> None:
    encodings = {e["encoding"] for e in _index(saved)["tensors"].values() if "encoding" in e}
    assert {"dense", "nm", "csr", "bitmask"} <= encodings


def test_truncated_file_names_the_tensor(ck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model_built(monkeypatch)
    path = ck / "model.sparse.safetensors"
    header, start = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    tensor = last.split("::")[0]
    with pytest.raises(CheckpointError, match=f"tensor {tensor}:.*truncated"):
        load(ck)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load(ck)


def test_flipped_byte_names_the_tensor(ck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model_built(monkeypatch)
    path = ck / "model.sparse.safetensors"
    header, start = _header(path)
    target = "model.layers.1.mlp.down_proj.weight::values"
    begin, end = header[target]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + (begin + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor model.layers.1.mlp.down_proj.weight: .*checksum"):
        load(ck)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.update(version=99), "version 99"),
        (lambda i: i.update(format="something-else"), "not a prunelab-sparse index"),
        (lambda i: i["tensors"]["model.layers.0.self_attn.q_proj.weight"].update(nnz=5), "q_proj.weight"),
        (lambda i: i["tensors"]["model.layers.0.self_attn.q_proj.weight"].update(shape=[64, 65]), "q_proj.weight"),
        (lambda i: i["tensors"]["model.layers.0.mlp.up_proj.weight"].update(encoding="zip"), "up_proj.weight"),
        (lambda i: i["tensors"]["model.layers.0.mlp.up_proj.weight"]["params"].update(m=8), "up_proj.weight"),
        (lambda i: i["tensors"]["model.norm.weight"].update(dtype="float16"), "model.norm.weight"),
        (lambda i: i["tensors"]["model.norm.weight"]["components"]["data"].update(key="nope"), "model.norm.weight"),
        (lambda i: i["tensors"]["model.norm.weight"].update(file="other.safetensors"), "model.norm.weight"),
        (lambda i: i["tensors"].update(extra={"alias_of": "missing.weight"}), "tensor extra"),
    ],
)
def test_bad_index_names_the_tensor(ck: Path, monkeypatch: pytest.MonkeyPatch, edit, message: str) -> None:
    _no_model_built(monkeypatch)
    index = _index(ck)
    edit(index)
    _write_index(ck, index)
    with pytest.raises(CheckpointError, match=message):
        load(ck)


def test_unreadable_index_and_missing_files(ck: Path) -> None:
    (ck / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(ck)
    (ck / INDEX_NAME).unlink()
    with pytest.raises(CheckpointError, match="no sparse_index.json"):
        load(ck)


def test_missing_weights_file(ck: Path) -> None:
    (ck / "model.sparse.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(ck)


def _rewrite_component(ck: Path, key: str, fn) -> None:
    """Change one component and fix its checksum, so only the structural checks can catch it."""
    from safetensors.torch import load_file, save_file

    from prunelab.storage.checkpoint import _crc

    path = ck / "model.sparse.safetensors"
    tensors = load_file(str(path))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path))
    index = _index(ck)
    name, comp = key.split("::")
    entry = index["tensors"][name]["components"][comp]
    entry["crc32"], entry["shape"] = _crc(tensors[key]), list(tensors[key].shape)
    _write_index(ck, index)


def _first(ck: Path, encoding: str) -> str:
    return next(k for k, e in _index(ck)["tensors"].items() if e.get("encoding") == encoding)


def test_structural_damage_with_valid_checksum(ck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model_built(monkeypatch)
    csr = _first(ck, "csr")

    def out_of_range(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[-1] = 0xFF if t.dtype == torch.uint8 else 0xFFFF  # an escape last / a column past the end
        return t

    _rewrite_component(ck, f"{csr}::indices", out_of_range)
    with pytest.raises(CheckpointError, match=f"tensor {csr}: "):
        load(ck)


def test_bitmask_and_nm_structural_damage(ck: Path) -> None:
    bm = _first(ck, "bitmask")
    _rewrite_component(ck, f"{bm}::mask", lambda t: t ^ 0x01)  # popcount no longer equals nnz
    with pytest.raises(CheckpointError, match=f"tensor {bm}: bitmask has"):
        size_report(ck)


def test_nm_and_nnz_damage() -> None:
    w = _nm((8, 16), 2, 4)
    enc = encode_tensor(w)
    bad = EncodedTensor(enc.name or "w", enc.encoding, enc.shape, enc.dtype, enc.nnz,
                        {**enc.components, "groups": torch.full_like(enc.components["groups"], 0xFF)}, enc.params)
    with pytest.raises(CheckpointError, match="tensor w: nm group code"):
        bad.to_dense()
    zeros = EncodedTensor("w", enc.encoding, enc.shape, enc.dtype, enc.nnz,
                          {**enc.components, "values": torch.zeros_like(enc.components["values"])}, enc.params)
    with pytest.raises(CheckpointError, match="tensor w: decoded 0 nonzeros"):
        zeros.to_dense()


# -- size report and CLI -------------------------------------------------------------------------


def test_size_report_numbers(saved: Path) -> None:
    rep = size_report(saved)
    index = _index(saved)
    rows = {r["name"]: r for r in rep["tensors"]}
    for name, e in index["tensors"].items():
        if "alias_of" in e:
            continue
        r = rows[name]
        n, nnz, bits = math.prod(e["shape"]), e["nnz"], 32
        s = 1 - nnz / n
        assert r["bitmask_bound_bytes"] == pytest.approx(n * ((1 - s) * bits + 1) / 8)
        h = 0.0 if s in (0.0, 1.0) else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))
        assert r["entropy_bound_bytes"] == pytest.approx(n * (h + (1 - s) * bits) / 8)
        assert r["entropy_bound_bytes"] <= r["bitmask_bound_bytes"] + 1e-9
    pruned = rep["totals"]["pruned"]
    assert pruned["count"] == 14 and pruned["stored_vs_bitmask_bound"] < 1.0
    ck = rep["checkpoint"]
    on_disk = sum(p.stat().st_size for p in saved.iterdir())
    assert ck["total_file_bytes"] == on_disk and ck["ratio"] < 0.6


def test_cli_size(saved: Path, tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    from prunelab.cli import app

    runner = CliRunner(env={"COLUMNS": "250"})
    res = runner.invoke(app, ["size", str(saved), "--json", str(tmp_path / "size.json")])
    assert res.exit_code == 0, res.output
    assert "pruned matrices" in res.output and "model.layers.0.mlp.up_proj.weight" in res.output
    assert json.loads((tmp_path / "size.json").read_text())["totals"]["pruned"]["count"] == 14
    res = runner.invoke(app, ["size", str(saved), "--by-type"])
    assert res.exit_code == 0 and "gate" in res.output
    res = runner.invoke(app, ["size", str(tiny_dirs["llama"])])  # a dense HF checkpoint: estimated sizes
    assert res.exit_code == 0 and "estimated" in res.output
    res = runner.invoke(app, ["size", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, CheckpointError)


def test_size_report_estimates_hf_checkpoint(tmp_path: Path) -> None:
    """For a dense-format checkpoint the report predicts exactly what the sparse format stores."""
    lm = _pruned_lm("llama", "u90")
    lm.model.save_pretrained(tmp_path / "hf")
    est = size_report(tmp_path / "hf")
    real = size_report(save(lm, tmp_path / "sp", format="sparse"))
    assert est["estimated"] and not real["estimated"]

    def key(rep: dict) -> dict:
        return {r["name"]: (r["encoding"], r["nnz"], r["stored_bytes"], r["prunable"]) for r in rep["tensors"]}

    assert key(est) == key(real)
    assert est["totals"]["pruned"] == real["totals"]["pruned"]
    assert est["checkpoint"]["ratio"] < 0.6


def test_load_reads_sparse_checkpoint(tmp_path: Path) -> None:
    """`load(dir)` recognises a sparse checkpoint and decodes it exactly, with its tokenizer."""
    lm = _pruned_lm("t5", "u90")
    out = save(lm, tmp_path / "ck", format="sparse")
    back = load(str(out))
    assert back.family == "encoder-decoder" and len(back.prunable) == len(lm.prunable)
    assert back.tokenizer is not None
    for name, t in lm.model.state_dict().items():
        assert _same_bits(t, back.model.state_dict()[name]), name


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    lm = _pruned_lm("bart", "u90")
    out = save(lm, tmp_path / "ck", format="sparse", max_shard_bytes=20_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and files[0].startswith("model.sparse-00001-of-")
    loaded = load(out).model
    for name, t in lm.model.state_dict().items():
        assert _same_bits(t, loaded.state_dict()[name]), name
    assert size_report(out)["checkpoint"]["weights_file_bytes"] == sum((out / f).stat().st_size for f in files)


def test_tensor_missing_from_index(ck: Path) -> None:
    index = _index(ck)
    del index["tensors"]["model.norm.weight"]
    _write_index(ck, index)
    with pytest.raises(CheckpointError, match="tensor model.norm.weight is missing"):
        load(ck)


# -- one API, checkpoint hygiene -----------------------------------------------------------------


def test_iter_tensors_is_the_same_for_sparse_and_hf_checkpoints(tmp_path: Path) -> None:
    """`iter_tensors` streams the same dense tensors whatever the format (tied weights once)."""
    lm = _pruned_lm("llama", "u90")
    hf = dict(iter_tensors(save(lm, tmp_path / "hf", format="hf")))
    sparse = dict(iter_tensors(save(lm, tmp_path / "sp", format="sparse")))
    assert hf.keys() == sparse.keys()
    for name, t in hf.items():
        assert _same_bits(t, sparse[name]), name
    back = load(tmp_path / "hf")
    for name, t in lm.model.state_dict().items():
        assert _same_bits(t, back.model.state_dict()[name]), name
    with pytest.raises(ConfigError, match="unknown --format"):
        save(lm, tmp_path / "x", format="zip")  # type: ignore[arg-type]


def test_sparse_weights_without_index_are_a_damaged_checkpoint(ck: Path) -> None:
    (ck / INDEX_NAME).unlink()
    assert is_sparse_checkpoint(ck)  # its weights files say so: the loader must not treat it as dense
    with pytest.raises(CheckpointError, match="no sparse_index.json"):
        load(ck)


def _size_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ck: Path) -> tuple[int, str]:
    from cli_helpers import run_cli

    return run_cli(monkeypatch, capsys, "size", str(ck))


def test_cli_size_refuses_a_truncated_checkpoint(ck: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _size_cli(monkeypatch, capsys, ck)
    assert code == 0 and "totals" in text
    path = ck / "model.sparse.safetensors"
    header, _ = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    code, text = _size_cli(monkeypatch, capsys, ck)
    assert code == 2, text
    assert text.strip().count("\n") == 0 and f"tensor {last.split('::')[0]}:" in text and "truncated" in text
    assert "totals" not in text


def test_cli_size_refuses_a_flipped_byte(ck: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = ck / "model.sparse.safetensors"
    header, start = _header(path)
    target = "model.layers.0.self_attn.q_proj.weight::values"
    begin, end = header[target]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + (begin + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, text = _size_cli(monkeypatch, capsys, ck)
    assert code == 2, text
    assert text.strip().count("\n") == 0
    assert "tensor model.layers.0.self_attn.q_proj.weight: " in text and "checksum" in text


def _modes(root: Path) -> set[tuple[str, int]]:
    import stat

    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("fmt", ["hf", "sparse"])
def test_saved_checkpoints_follow_the_umask(tmp_path: Path, fmt: str, umask: int) -> None:
    """Every file and folder of a saved checkpoint gets the user's umask (no 0600 temporary-file modes)."""
    import os

    extra_dir = tmp_path / "extra"
    extra_dir.mkdir()
    (extra_dir / "notes.txt").write_text("private source, public copy")
    (extra_dir / "notes.txt").chmod(0o600)
    extra_dir.chmod(0o700)
    lm = wrap_model(tiny_model("gpt2"), tokenizer=byte_tokenizer())
    old = os.umask(umask)
    try:
        out = save(lm, tmp_path / "ck", format=fmt, extra_files=[extra_dir])  # type: ignore[arg-type]
    finally:
        os.umask(old)
    assert (out / "extra" / "notes.txt").is_file()
    assert _modes(out) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
