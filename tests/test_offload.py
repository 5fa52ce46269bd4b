"""Out of core (issue 13): block-by-block from disk equals in memory, bit for bit.

Every tiny architecture, each streaming method: the checkpoint written block by block by
`prune_to_disk` holds exactly the weights (and so the masks) the in-memory `prune` gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_cli
from prunelab.errors import ConfigError
from prunelab.models import TINY_ARCHS, byte_tokenizer
from prunelab.pruning import PruneConfig, prune
from prunelab.pruning.offload import prune_to_disk
from prunelab.storage import load

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _config(method: str, small_text: Path, pattern: str = "unstructured") -> PruneConfig:
    return PruneConfig(method=method, sparsity=0.5, pattern=pattern, nsamples=4, seqlen=32, calib=str(small_text))


def _written(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "magnitude-layer", "wanda", "sparsegpt"])
def test_out_of_core_equals_in_memory(tiny_dirs, small_text, tmp_path, arch, method):
    config = _config(method, small_text)
    lm = load(tiny_dirs[arch])
    ref = prune(lm, config)
    lazy = load(tiny_dirs[arch], offload=True)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    res = prune_to_disk(lazy, config, tmp_path / "out")
    written = _written(tmp_path / "out")
    state = lm.model.state_dict()
    for m in lm.prunable:
        w = written[m.param_name]
        assert torch.equal(w, state[m.param_name]), m.name  # weights, hence masks, identical
        assert torch.equal(res.masks[m.name], ref.masks[m.name]), m.name
    for name, t in written.items():  # everything else copied unchanged
        assert torch.equal(t, state[name]), name
    assert res.matrices == ref.matrices
    assert (res.total_params, res.total_zeros) == (ref.total_params, ref.total_zeros)
    again = load(tmp_path / "out")  # a normal HF checkpoint: from_pretrained reads the shards + index
    for m in lm.prunable:
        assert torch.equal(m.weight(again.model), m.weight(lm.model))
    assert lazy.offload.resident == set()  # every block released


def test_nm_pattern_out_of_core(tiny_dirs, small_text, tmp_path):
    config = _config("wanda", small_text, "2:4")
    lm = load(tiny_dirs["llama"])
    ref = prune(lm, config)
    res = prune_to_disk(load(tiny_dirs["llama"], offload=True), config, tmp_path / "out")
    written = _written(tmp_path / "out")
    for m in lm.prunable:
        assert torch.equal(written[m.param_name], m.weight(lm.model))
        assert torch.equal(res.masks[m.name], ref.masks[m.name])


def test_budget_smaller_than_a_block_is_one_line(tiny_dirs):
    message = r"--max-memory 1.0 kB is smaller than block model.layers.\d, which needs \d+.\d kB: raise --max-memory"
    with pytest.raises(ConfigError, match=message):
        load(tiny_dirs["llama"], offload=True, max_memory=1000)


def test_cuda_without_a_gpu_is_one_line(tiny_dirs):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load(tiny_dirs["llama"], offload=True, device="cuda")


def test_unsupported_method_out_of_core_says_so(tiny_dirs, small_text, tmp_path):
    lazy = load(tiny_dirs["llama"], offload=True)
    with pytest.raises(ConfigError, match="--offload none"):
        prune_to_disk(lazy, PruneConfig(method="structured", sparsity=0.5), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_out_of_core_perplexity_equals_in_memory(tiny_dirs, small_text, arch):
    from prunelab.evaluation import EvalOptions, evaluate

    options = EvalOptions(seqlen=64, max_tokens=6 * 64, batch_size=4, data=str(small_text))
    ref = evaluate(load(tiny_dirs[arch]), "ppl", options)
    lazy = load(tiny_dirs[arch], offload=True)
    got = evaluate(lazy, "ppl", options)
    assert got.value == ref.value and got.details["out_of_core"] and not ref.details["out_of_core"]
    assert got.details["interval_data"] == ref.details["interval_data"]
    assert lazy.offload.resident == set()
    blocks = len(lazy.offload.blocks())
    per_block = lazy.offload.total_bytes / (blocks + 1)  # every block read once (two batches), not per batch
    assert lazy.offload.bytes_read < lazy.offload.total_bytes + 3 * per_block * 2


def test_out_of_core_seq2seq_perplexity_streams_per_forward(tiny_dirs, small_text):
    from prunelab.evaluation import EvalOptions, evaluate

    options = EvalOptions(max_examples=8, batch_size=4, data=str(small_text))
    ref = evaluate(load(tiny_dirs["t5"]), "seq2seq-ppl", options)
    got = evaluate(load(tiny_dirs["t5"], offload=True), "seq2seq-ppl", options)
    assert got.value == ref.value


def _synthetic_llama(path: Path, layers: int = 6, hidden: int = 384) -> Path:
    from transformers import LlamaConfig

    from prunelab.storage.synthetic import random_checkpoint

    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, vocab_size=269, max_position_embeddings=256)
    return random_checkpoint(config, path, tokenizer=byte_tokenizer())


def test_random_checkpoint_loads_with_from_pretrained(tmp_path):
    src = _synthetic_llama(tmp_path / "synth", layers=2, hidden=96)
    lm = load(src)
    lazy = load(src, offload=True)
    ids = torch.randint(0, 269, (1, 10))
    with torch.no_grad(), lazy.offload.outside():
        assert torch.equal(lm.model(input_ids=ids).logits, lazy.model(input_ids=ids).logits)
    w = lm.model.model.layers[0].mlp.down_proj.weight
    assert 0.015 < float(w.detach().std()) < 0.025


def test_cli_out_of_core_prune_and_eval(monkeypatch, capsys, tiny_dirs, small_text, tmp_path):
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--offload",
                         "disk", "--calib", str(small_text), "--nsamples", "4", "--seqlen", "32",
                         "--out", str(tmp_path / "out"))
    assert code == 0, text
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["offload"]["mode"] == "disk" and len(report["offload"]["block_seconds"]) == 2
    assert report["offload"]["bytes_written"] > 0 and report["achieved_sparsity_prunable"] == 0.5
    code, text = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "out"), "--bench", "ppl", "--offload", "disk",
                         "--seqlen", "64", "--max-tokens", "256", "--data", str(small_text),
                         "--out", str(tmp_path / "ppl.json"))
    assert code == 0, text
    assert json.loads((tmp_path / "ppl.json").read_text())["results"][0]["details"]["out_of_core"]


@pytest.mark.parametrize("args, message", [
    (["--offload", "disk", "--max-memory", "10kB"], "--max-memory 10.0 kB is smaller than block model.layers"),
    (["--offload", "disk", "--max-memory", "lots"], "cannot read the memory size 'lots'"),
    (["--offload", "disk", "--device", "cuda"], "no CUDA GPU"),
    (["--offload", "sometimes"], "unknown --offload 'sometimes'"),
    (["--offload", "disk", "--format", "sparse"], "--offload disk writes --format hf"),
])
def test_cli_out_of_core_bad_input_is_one_line(monkeypatch, capsys, tiny_dirs, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "magnitude", *args,
                         "--out", str(tmp_path / "out"))
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "out").exists()


def test_sigkill_leaves_no_output_and_the_rerun_completes(tmp_path, small_text):
    src = _synthetic_llama(tmp_path / "synth", layers=8, hidden=384)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "prunelab"), "prune", str(src), "--method", "sparsegpt", "--offload",
           "disk", "--calib", str(small_text), "--nsamples", "8", "--seqlen", "64",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(tmp_path.glob(".out.tmp-*/model-00002.safetensors")):  # two blocks written, six to go
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and any(tmp_path.glob(".out.tmp-*"))  # only the dead run's temporary folder
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "prune_report.json").read_text())["achieved_sparsity_prunable"] == 0.5
    assert not any(tmp_path.glob(".out.tmp-*"))  # the orphan was cleared


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_smollm2_out_of_core_equals_in_memory(tmp_path, small_text, method):
    """The real model: identical weights, masks and perplexity in memory and out of core."""
    from prunelab.evaluation import EvalOptions, evaluate

    config = PruneConfig(method=method, sparsity=0.5, nsamples=4, seqlen=128, calib=str(small_text))
    lm = load("zoo:smollm2")
    ref = prune(lm, config)
    res = prune_to_disk(load("zoo:smollm2", offload=True), config, tmp_path / "out")
    written = _written(tmp_path / "out")
    for m in lm.prunable:
        assert torch.equal(written[m.param_name], m.weight(lm.model)), m.name
        assert torch.equal(res.masks[m.name], ref.masks[m.name]), m.name
    del written, ref
    options = EvalOptions(seqlen=128, max_tokens=2 * 128, data=str(small_text))
    assert evaluate(load(tmp_path / "out", offload=True), "ppl", options).value == evaluate(lm, "ppl", options).value


@pytest.mark.parametrize("chunk_mb", [None, "0.05"])
def test_activations_spill_to_disk_over_budget(tiny_dirs, small_text, tmp_path, monkeypatch, chunk_mb):
    """Activations above a quarter of --max-memory go to temporary files (in one chunk or several): same result."""
    import prunelab.pruning.sequential as seq

    if chunk_mb is not None:  # several chunks: statistics pass, prune, output pass, each chunk read back
        monkeypatch.setenv("PRUNELAB_CALIB_MEMORY_MB", chunk_mb)
    config = PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=16, seqlen=64, calib=str(small_text))
    lm = load(tiny_dirs["llama"])
    prune(lm, config)
    lazy = load(tiny_dirs["llama"], offload=True)
    budget = max(lazy.offload.unit_bytes(u) for u in lazy.offload.units)
    lazy = load(tiny_dirs["llama"], offload=True, max_memory=budget)
    spilled: list[int] = []
    keep = seq.ActivationSpill.keep
    monkeypatch.setattr(seq.ActivationSpill, "keep",
                        lambda self, h, c: spilled.append(self.folder is not None) or keep(self, h, c))
    prune_to_disk(lazy, config, tmp_path / "out")
    assert spilled and all(spilled)
    written = _written(tmp_path / "out")
    for m in lm.prunable:
        assert torch.equal(written[m.param_name], m.weight(lm.model)), m.name
