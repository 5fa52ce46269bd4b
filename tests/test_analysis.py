"""`prunelab analyze`: streamed statistics against an independent numpy/torch reference.

The reference side never uses prunelab.analysis: tensors are loaded whole with
`safetensors.torch.load_file`, grouped with the roles `load` (a real, instantiated model)
reports, and reduced with numpy in float64.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from prunelab.analysis import EDGES, QUANTILES, THRESHOLDS, Summary, analyze, merged, plan, scan, summarize
from prunelab.cli import app
from prunelab.models import save_tiny
from prunelab.storage import load

ARCHS = ["gpt2", "llama", "bert", "bart", "t5"]


# ----- reference -------------------------------------------------------------------------------


def _checkpoint(directory: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if v.is_floating_point():
                out[k] = v.to(torch.float64).numpy().reshape(-1)
    return out


MAX_BIN_LOG10 = float(np.diff(np.log10(EDGES)).max()) + 1e-12


def _bin(values: np.ndarray) -> np.ndarray:
    return np.searchsorted(EDGES, values, side="right")


def _check_group(got: dict, arrays: list[np.ndarray], *, what: str) -> None:
    """Every number of one stats.json group against numpy over the same weights."""
    a = np.abs(np.concatenate(arrays))
    n = a.size
    assert got["params"] == n, what
    assert got["zeros"] == int((a == 0).sum()), what
    assert got["nonfinite"] == int((~np.isfinite(a)).sum()), what
    for key, t in THRESHOLDS.items():
        ref = float((a < t).sum()) / n
        assert abs(got["fraction_below"][key] - ref) <= 1e-9, (what, key, got["fraction_below"][key], ref)
        assert got["below"][key] == int((a < t).sum()), (what, key)
    a = a[np.isfinite(a)]  # NaN/inf count in params only (fractions are over params: never below)
    assert math.isclose(got["mean"], math.fsum(a) / a.size, rel_tol=1e-9), what
    assert math.isclose(got["std"], float(a.std()), rel_tol=1e-7), what
    assert got["max"] == float(a.max()), what
    hist_ref = np.bincount(_bin(a[a > 0]), minlength=len(EDGES) + 1)
    assert got["hist"] == hist_ref.tolist(), what
    assert sum(got["hist"]) + got["zeros"] + got["nonfinite"] == n
    for key, q in QUANTILES.items():
        exact = float(np.quantile(a, q))
        est = got["quantiles"][key]
        if exact == 0.0:
            assert est == 0.0, (what, key)
        elif EDGES[0] <= exact < EDGES[-1]:  # "within one bin": a factor of at most the widest bin
            assert abs(math.log10(est / exact)) <= MAX_BIN_LOG10, (what, key, est, exact)


@pytest.fixture(scope="module")
def analyzed(tiny_dirs, tmp_path_factory) -> dict[str, dict]:
    """stats.json of each tiny architecture (plots only for one of them, to stay fast)."""
    root = tmp_path_factory.mktemp("analysis")
    out = {}
    for arch in ARCHS:
        out[arch] = analyze(str(tiny_dirs[arch]), root / arch, plots=(arch == "bart"))
        out[arch]["_dir"] = root / arch
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_match_numpy_reference(tiny_dirs, analyzed, arch):
    stats = analyzed[arch]
    weights = _checkpoint(tiny_dirs[arch])
    lm = load(str(tiny_dirs[arch]))
    assert stats["family"] == lm.family
    # Scope: exactly the prunable matrices the loader lists (checkpoint keys = parameter names here).
    expected = {m.param_name: m for m in lm.prunable}
    assert set(stats["matrices"]) == set(expected)
    for name, m in stats["matrices"].items():
        pm = expected[name]
        assert (m["stack"], m["block"], m["module_type"]) == (pm.stack, pm.block, pm.module_type)
        _check_group(m, [weights[name]], what=name)
    _check_group(stats["overall"], [weights[k] for k in expected], what="overall")
    blocks: dict[str, list[np.ndarray]] = {}
    types: dict[str, list[np.ndarray]] = {}
    for k, pm in expected.items():
        blocks.setdefault(f"{pm.stack}.{pm.block}", []).append(weights[k])
        types.setdefault(pm.module_type, []).append(weights[k])
    assert set(stats["by_block"]) == set(blocks)
    assert set(stats["by_module_type"]) == set(types)
    for key, arrays in blocks.items():
        _check_group(stats["by_block"][key], arrays, what=key)
    for key, arrays in types.items():
        _check_group(stats["by_module_type"][key], arrays, what=key)


def test_encoder_decoder_blocks_kept_apart(analyzed):
    for arch in ("bart", "t5"):
        keys = list(analyzed[arch]["by_block"])
        assert keys == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"], (arch, keys)


def test_output_files_and_json(analyzed):
    d = analyzed["bart"]["_dir"]
    for name in ("stats.json", "stats.csv", "hist_abs_log.png", "cdf_abs.png", "cdf_by_block.png",
                 "heatmap_below_1e-2.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    for png in d.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((d / "stats.json").read_text())
    assert {"model", "family", "overall", "by_block", "by_module_type", "matrices"} <= set(on_disk)
    assert list(on_disk["overall"]["fraction_below"]) == ["1e-4", "1e-3", "1e-2", "1e-1", "1"]
    assert list(on_disk["overall"]["quantiles"]) == ["1", "10", "50", "90", "99", "99.9"]
    rows = (d / "stats.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(on_disk["matrices"])
    # Merged histograms add up exactly: blocks -> overall, module types -> overall.
    total = np.array(on_disk["overall"]["hist"])
    assert (sum(np.array(g["hist"]) for g in on_disk["by_block"].values()) == total).all()
    assert (sum(np.array(g["hist"]) for g in on_disk["by_module_type"].values()) == total).all()


def test_all_scope_adds_embeddings_norms_biases(tiny_dirs, tmp_path):
    stats = analyze(str(tiny_dirs["bert"]), tmp_path / "out", include_all=True, plots=False)
    weights = _checkpoint(tiny_dirs["bert"])
    assert set(stats["matrices"]) == set(weights)  # every float tensor of the checkpoint
    assert {"embedding", "norm", "bias", "q", "up"} <= set(stats["by_module_type"])
    assert stats["overall"]["params"] == sum(w.size for w in weights.values())
    assert stats["matrices"]["bert.embeddings.word_embeddings.weight"]["module_type"] == "embedding"
    assert stats["matrices"]["bert.encoder.layer.1.output.LayerNorm.weight"]["block"] == 1
    assert stats["matrices"]["bert.encoder.layer.1.output.LayerNorm.weight"]["module_type"] == "norm"
    assert stats["matrices"]["bert.encoder.layer.0.attention.self.query.bias"]["module_type"] == "bias"
    assert "outside" in stats["by_block"]


# ----- exactness at the edges, other dtypes, bare checkpoints ----------------------------------------


def _edgy_tiny(directory: Path, dtype: torch.dtype) -> Path:
    """A tiny llama whose weights include zeros, values exactly at the thresholds and their neighbours."""
    save_tiny("llama", directory)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(0)
    for k, v in tensors.items():
        if v.dim() == 2 and "layers" in k:
            flat = v.reshape(-1)
            flat[: flat.numel() // 5] = 0.0  # 20 % exact zeros, like a pruned model
            special = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float32).to(dtype).to(torch.float32)
            near = torch.cat([special, torch.nextafter(special, torch.zeros(5)), -special])
            idx = torch.randint(flat.numel() // 5, flat.numel(), (near.numel(),), generator=gen)
            flat[idx] = near
            flat[-7:] = torch.logspace(-12, 5, 7)  # underflow and overflow bins
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_at_threshold_values_and_half_dtypes(tmp_path, dtype):
    src = _edgy_tiny(tmp_path / "m", dtype)
    stats = analyze(str(src), tmp_path / "out", plots=False)
    weights = _checkpoint(src)
    assert stats["overall"]["zeros"] > 0
    for name, m in stats["matrices"].items():
        _check_group(m, [weights[name]], what=f"{name} {dtype}")


def test_sharded_bf16_checkpoint_like_the_hub(tiny_dirs, tmp_path):
    """Hub checkpoints are bf16 and sharded: every shard is read, and the numbers equal numpy's."""
    lm = load(str(tiny_dirs["llama"]))
    sharded = tmp_path / "sharded"
    lm.model.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    stats = analyze(str(sharded), tmp_path / "out", plots=False)
    weights = _checkpoint(sharded)
    assert set(stats["matrices"]) == {m.param_name for m in lm.prunable}
    for name, m in stats["matrices"].items():
        _check_group(m, [weights[name]], what=name)
    _check_group(stats["overall"], [weights[k] for k in stats["matrices"]], what="overall")


def test_bare_base_model_checkpoint_keys_are_matched(tmp_path):
    """A checkpoint saved from BertModel has no `bert.` prefix (like zoo:minilm); keys still map."""
    from transformers import BertModel

    from prunelab.models.tiny import tiny_config

    cfg = tiny_config("bert")
    cfg.architectures = ["BertModel"]
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "bare")
    stats = analyze(str(tmp_path / "bare"), tmp_path / "out", plots=False)
    assert len(stats["matrices"]) == 12
    assert "encoder.layer.0.attention.self.query.weight" in stats["matrices"]
    assert list(stats["by_block"]) == ["encoder.0", "encoder.1"]


def test_legacy_gpt2_layout_prefixless_keys_and_buffers(tmp_path):
    """Hub GPT-2 checkpoints: keys without `transformer.`, plus float `attn.bias` mask buffers (not weights)."""
    src = save_tiny("gpt2", tmp_path / "legacy")
    path = src / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    dropped = "h.1.mlp.c_proj.weight"
    del tensors[dropped]
    save_file(tensors, str(path), metadata={"format": "pt"})
    stats = analyze(str(src), tmp_path / "out", include_all=True, plots=False)
    assert "h.0.attn.c_attn.weight" in stats["matrices"]
    assert stats["matrices"]["h.0.attn.c_attn.weight"]["module_type"] == "qkv"
    assert "h.0.attn.bias" not in stats["matrices"] and "h.0.attn.bias" in stats["unmatched_checkpoint_keys"]
    assert stats["missing_prunable_matrices"] == ["transformer." + dropped]
    assert sum(m["prunable"] for m in stats["matrices"].values()) == 7


# ----- streaming mechanics ----------------------------------------------------------------------


def test_chunking_and_threads_do_not_change_results(tiny_dirs):
    p = plan(str(tiny_dirs["llama"]), include_all=True)
    whole = scan(p["tensors"], workers=1)
    tiny_chunks = scan(p["tensors"], chunk_bytes=4096, workers=3)
    mapped = scan(p["tensors"], chunk_bytes=4096, workers=3, io="mmap")
    preadv = scan(p["tensors"], chunk_bytes=8192, workers=2, io="read")
    for k in whole:
        a = whole[k]
        for b in (tiny_chunks[k], mapped[k], preadv[k]):
            assert (a.counts == b.counts).all() and (a.below == b.below).all()
            assert (a.params, a.zeros, a.max) == (b.params, b.zeros, b.max)
            assert math.isclose(a.mean, b.mean, rel_tol=1e-12) and math.isclose(a.std, b.std, rel_tol=1e-9)


def test_float16_widening_is_exact_for_every_bit_pattern():
    from prunelab.analysis.stats import _half_abs_bits

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = np.abs(h.view(np.float16).astype(np.float32))
    got = np.array([_half_abs_bits(v) for v in h], dtype=np.uint32).view(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)) and np.isnan(got[nan]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_reader_across_pieces_with_nonfinite(tmp_path, dtype):
    """The pread loop (256 KiB pieces) against the Python reader and numpy, on tensors of several
    pieces with a ragged tail, NaN/inf only in a later piece, and jobs split mid-tensor."""
    from prunelab.analysis.reader import read_header

    gen = torch.Generator().manual_seed(3)
    big = torch.randn(300_007, generator=gen) * 0.02
    big[:50_000] = 0.0
    big[200_001], big[200_002], big[299_999] = float("nan"), float("inf"), float("-inf")
    small = torch.randn(1001, generator=gen) * 10.0 ** torch.empty(1001).uniform_(-12, 5, generator=gen)
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": big.to(dtype), "b.weight": small.to(dtype)}, str(path))
    tensors = read_header(path)
    fast = scan(tensors, workers=2)
    split = scan(tensors, chunk_bytes=100_000, workers=2)
    python = scan(tensors, workers=1, io="mmap")
    ref = load_file(str(path))
    for name, s in python.items():
        a = np.abs(ref[name].to(torch.float64).numpy())
        finite = a[np.isfinite(a)]
        assert s.nonfinite == a.size - finite.size and s.zeros == int((a == 0).sum())
        assert s.max == finite.max() and math.isclose(s.mean, math.fsum(finite) / finite.size, rel_tol=1e-9)
        for key, t in THRESHOLDS.items():
            assert s.below_count(key) == int((a < t).sum())
        for other in (fast[name], split[name]):
            assert (other.counts == s.counts).all() and (other.below == s.below).all()
            assert (other.params, other.zeros, other.nonfinite, other.max) == (s.params, s.zeros, s.nonfinite, s.max)
            assert math.isclose(other.mean, s.mean, rel_tol=1e-12) and math.isclose(other.std, s.std, rel_tol=1e-9)


def test_failed_pread_falls_back_to_the_python_reader_in_small_windows(tmp_path, monkeypatch):
    """An OSError from the compiled loop (e.g. EINTR on a network file system) is retried by the
    mmap reader, in 2 MiB windows even though pread jobs are 16 MiB; float64 takes that path too."""
    import prunelab.analysis.core as core
    from prunelab.analysis.reader import CHUNK_BYTES, read_header

    path = tmp_path / "w.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(1_500_000, generator=gen), "b.weight": torch.randn(700_000, dtype=torch.float64,
                                                                                          generator=gen)}, str(path))
    tensors = read_header(path)
    expected = scan(tensors, workers=1, io="mmap")

    def broken(*args, **kwargs):
        raise OSError("interrupted")

    windows = []
    real_with_chunk = core.with_chunk
    monkeypatch.setattr(core, "summarize_file_range", broken)
    monkeypatch.setattr(core, "with_chunk", lambda info, off, n, *a, **k: windows.append(n) or real_with_chunk(
        info, off, n, *a, **k))
    got = scan(tensors, workers=2)
    assert max(windows) <= CHUNK_BYTES and len(windows) >= 6
    for name, s in expected.items():
        assert (got[name].counts == s.counts).all() and got[name].params == s.params
        assert math.isclose(got[name].mean, s.mean, rel_tol=1e-12)


def test_window_still_referenced_does_not_crash_the_reader(tmp_path):
    """A consumer that keeps the window (what numba's compiler did with its first argument, on a
    cold cache, for float64 checkpoints) must not turn into a BufferError."""
    from prunelab.analysis.reader import read_header, with_chunk

    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.arange(1000, dtype=torch.float64)}, str(path))
    info = read_header(path)[0]
    kept = []
    assert with_chunk(info, info.start, info.nbytes, lambda a: kept.append(a) or float(a.sum())) == 499500.0


def test_file_truncated_after_planning_is_a_checkpoint_error(tmp_path):
    from prunelab.analysis.reader import read_header
    from prunelab.errors import CheckpointError

    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.ones(100_000)}, str(path))
    tensors = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    for io in ("pread", "mmap", "read"):
        with pytest.raises(CheckpointError, match="a.weight"):
            scan(tensors, workers=2, io=io)


def test_summary_merge_equals_whole_and_handles_nonfinite():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-11, 5, 200_000)).astype(np.float32)
    x[::97] = 0.0
    x[5], x[6], x[7] = np.nan, np.inf, -np.inf
    whole = summarize(x)
    parts = merged(summarize(part) for part in np.array_split(x, 7))
    assert (whole.counts == parts.counts).all() and whole.zeros == parts.zeros == int((x == 0).sum())
    assert whole.nonfinite == 3 and parts.nonfinite == 3
    finite = np.abs(x[np.isfinite(x)].astype(np.float64))
    assert math.isclose(whole.mean, math.fsum(finite) / finite.size, rel_tol=1e-12)
    assert math.isclose(parts.mean, whole.mean, rel_tol=1e-12)
    assert math.isclose(whole.std, float(finite.std()), rel_tol=1e-9)
    assert whole.max == float(finite.max())
    for t in THRESHOLDS:
        assert whole.below_count(t) == int((np.abs(x.astype(np.float64)) < THRESHOLDS[t]).sum())
    # float64 input takes the other kernel and must agree.
    as64 = summarize(x.astype(np.float64))
    assert (as64.counts == whole.counts).all() and (as64.below == whole.below).all()
    assert Summary.from_dict(whole.to_dict()).quantile(0.5) == whole.quantile(0.5)


def test_std_accurate_with_large_mean():
    """Shifted sums: a tiny spread around a large |w| keeps its precision (naive E[x²]-E[x]² would not)."""
    x = (1000.0 + np.linspace(-1e-3, 1e-3, 100_001)).astype(np.float64)
    s = summarize(x, chunk=1000)
    assert math.isclose(s.std, float(x.std()), rel_tol=1e-6)


# ----- bad input: one-line error, exit code != 0, nothing left behind ------------------------------


def _corrupt(directory: Path, how: str) -> Path:
    save_tiny("gpt2", directory)
    f = directory / "model.safetensors"
    data = f.read_bytes()
    if how == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        f.write_bytes(b"this is not a safetensors file at all" * 10)
    elif how == "bad-header":
        (n,) = struct.unpack("<Q", data[:8])
        f.write_bytes(data[:8] + b"{" + b" " * (n - 1) + data[8 + n :])
    return directory


def _non_transformer(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "resnet", "architectures": ["ResNetModel"]}))
    save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, str(directory / "model.safetensors"))
    return directory


def _linears_without_blocks(directory: Path) -> Path:
    """A valid decoder config, but the weights are not a transformer's (no numbered blocks)."""
    save_tiny("llama", directory)
    save_file({"head.weight": torch.ones(4, 4), "proj.weight": torch.ones(4, 4)}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("case", ["missing", "no-weights", "empty-dir", "truncated", "garbage", "bad-header",
                                  "non-transformer", "no-blocks"])
def test_bad_input_one_line_error_no_output(tmp_path, case):
    src = tmp_path / "model"
    if case == "no-weights":
        save_tiny("gpt2", src)
        (src / "model.safetensors").unlink()
    elif case == "empty-dir":
        src.mkdir()
    elif case in ("truncated", "garbage", "bad-header"):
        _corrupt(src, case)
    elif case == "non-transformer":
        _non_transformer(src)
    elif case == "no-blocks":
        _linears_without_blocks(src)
    out_parent = tmp_path / "results"
    out_parent.mkdir()
    result = CliRunner().invoke(app, ["analyze", str(src), "--out", str(out_parent / "DIR")])
    from prunelab.errors import PrunelabError

    assert result.exit_code != 0
    assert isinstance(result.exception, PrunelabError) or result.exit_code == 2, result.output
    message = str(result.exception)
    assert message and "\n" not in message, message
    assert list(out_parent.iterdir()) == [], "no partial output directory may be left"


def test_cli_prints_summary_and_writes_dir(tiny_dirs, tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(tiny_dirs["gpt2"]), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "<1e-2" in result.output and (tmp_path / "a" / "stats.json").is_file()
    assert (tmp_path / "a" / "cdf_by_block.png").is_file()


def test_cli_threads_option_changes_nothing_but_the_thread_count(tiny_dirs, tmp_path):
    runs = {}
    for n in ("1", "3"):
        result = CliRunner().invoke(app, ["analyze", str(tiny_dirs["llama"]), "--out", str(tmp_path / n),
                                          "--threads", n])
        assert result.exit_code == 0, result.output
        stats = json.loads((tmp_path / n / "stats.json").read_text())
        assert f"{n} threads" in stats["scan"]["how"]
        runs[n] = {k: stats[k] for k in ("overall", "by_block", "by_module_type", "matrices")}
    assert runs["1"] == runs["3"]
    bad = CliRunner().invoke(app, ["analyze", str(tiny_dirs["llama"]), "--out", str(tmp_path / "0"), "--threads", "0"])
    assert bad.exit_code != 0 and not (tmp_path / "0").exists()


def test_failed_run_keeps_previous_output(tiny_dirs, tmp_path):
    out = tmp_path / "DIR"
    analyze(str(tiny_dirs["gpt2"]), out, plots=False)
    before = (out / "stats.json").read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any PrunelabError
        analyze(str(tmp_path / "missing"), out, plots=False)
    assert (out / "stats.json").read_bytes() == before


def test_sparse_checkpoint_is_analyzed_like_its_dense_twin(tiny_dirs, tmp_path):
    """A `--format sparse` checkpoint gives the same statistics as the same weights saved densely."""
    from prunelab.analysis import analyze
    from prunelab.storage import load, save

    lm = load(str(tiny_dirs["gpt2"]))
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            w.masked_fill_(w.abs() < w.abs().quantile(0.7), 0.0)
    lm.model.save_pretrained(tmp_path / "dense")
    save(lm.model, tmp_path / "sparse", format="sparse")
    a = analyze(tmp_path / "dense", tmp_path / "a_dense", plots=False)
    b = analyze(tmp_path / "sparse", tmp_path / "a_sparse", plots=False)
    assert a["overall"]["zeros"] == b["overall"]["zeros"] > 0
    assert a["overall"]["fraction_below"] == b["overall"]["fraction_below"]
    assert a["by_block"].keys() == b["by_block"].keys()
    assert {k: v["params"] for k, v in a["matrices"].items()} == {k: v["params"] for k, v in b["matrices"].items()}
