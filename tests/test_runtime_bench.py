"""`bench_model` / `prunelab bench`: structure of the results, dense vs sparse, every text family."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from prunelab.runtime import bench_model
from prunelab.storage import load


def _prune(lm, sparsity: float) -> None:
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model)
            thr = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
            w.masked_fill_(w.abs() <= thr, 0.0)


@pytest.mark.parametrize("rss", [pytest.param(True, marks=pytest.mark.slow), False])
def test_bench_decoder_dense_vs_sparse_with_memory(tiny_dirs, rss):
    lm = load(str(tiny_dirs["llama"]))
    _prune(lm, 0.9)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = bench_model(lm, prefill_tokens=1000, decode_tokens=4, repeats=2, measure_rss=rss,
                      sparsify_kwargs={"force": "sell", "use_disk_cache": False})
    json.dumps(res)
    assert res["settings"]["prefill_tokens"] == 128 and res["notes"]  # clamped to max positions
    sp = res["speed"]
    for v in ("dense", "sparse"):
        assert sp[v]["prefill_tokens_per_s"] > 0 and sp[v]["decode_ms_per_token"] > 0
        assert len(sp[v]["decode_s_per_token_runs"]) == 2
    assert sp["sparse_vs_dense"]["same_greedy_tokens"] is True
    assert res["runtime"]["swapped"] == len(lm.prunable)
    assert res["size_on_disk"]["dense_safetensors_bytes"] > 0
    mem = res["memory"]
    if rss:  # a fresh subprocess loads the saved dense checkpoint, then swaps in the sparse runtime
        assert mem["dense_rss_delta_bytes"] > 0 and mem["swapped"] == len(lm.prunable)
    assert mem["weights_bytes"]["sparse"] < mem["weights_bytes"]["dense"]
    # The benchmarked model itself is untouched.
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", ["t5", "bert", "gpt2"])
def test_bench_other_families(tiny_dirs, arch):
    lm = load(str(tiny_dirs[arch]))
    _prune(lm, 0.8)
    res = bench_model(lm, prefill_tokens=32, decode_tokens=3, repeats=1, measure_size=False, measure_rss=False,
                      sparsify_kwargs={"force": "sell", "use_disk_cache": False})
    sp = res["speed"]
    assert sp["sparse"]["prefill_tokens_per_s"] > 0
    if lm.family == "encoder":
        assert sp["dense"]["decode_ms_per_token"] is None
    else:
        assert sp["sparse_vs_dense"]["same_greedy_tokens"] is True


def test_cli_bench_writes_json_and_rejects_bad_options(tiny_dirs, tmp_path):
    from prunelab.cli import app

    out = tmp_path / "b.json"
    runner = CliRunner()
    r = runner.invoke(app, ["bench", str(tiny_dirs["gpt2"]), "--no-sparse", "--no-rss", "--prefill-tokens", "16",
                            "--decode-tokens", "2", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert "sparse" not in data["speed"] and data["speed"]["dense"]["decode_ms_per_token"] > 0
    from prunelab.errors import ConfigError
    from prunelab.runtime.bench import run_bench

    with pytest.raises(ConfigError, match="repeats"):
        run_bench(str(tiny_dirs["gpt2"]), tmp_path / "x.json", repeats=0)
    assert not (tmp_path / "x.json").exists()


def test_load_for_inference_from_sparse_checkpoint(tiny_dirs, tmp_path):
    import prunelab.storage as storage
    from prunelab.runtime import load_for_inference, sparse_modules

    lm = load(str(tiny_dirs["llama"]))
    _prune(lm, 0.9)
    storage.save(lm, tmp_path / "sp", format="sparse")
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    lm2, summary = load_for_inference(str(tmp_path / "sp"), force="sell", use_disk_cache=False)
    assert summary.swapped == len(lm2.prunable) == len(sparse_modules(lm2.model))
    with torch.no_grad():
        torch.testing.assert_close(lm2.model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bench_speech_model_times_encoder_and_transcript_decode():
    """Whisper runs on the sparse runtime: prefill = encoder over one 30 s window, decode = transcript tokens."""
    lm = load("zoo:whisper-tiny-en")
    _prune(lm, 0.9)
    res = bench_model(lm, decode_tokens=4, repeats=1, measure_size=False, measure_rss=False,
                      sparsify_kwargs={"force": "sell", "use_disk_cache": False})
    assert res["settings"]["prefill_tokens"] == 3000 and "speech model" in res["notes"][0]
    sp = res["speed"]
    for v in ("dense", "sparse"):
        assert sp[v]["prefill_tokens_per_s"] > 0 and sp[v]["decode_ms_per_token"] > 0
    assert res["runtime"]["swapped"] == len(lm.prunable)
    assert sp["sparse_vs_dense"]["same_greedy_tokens"] is True
