"""Recovery (`prunelab.recovery`): the mask holds through every step, the losses fall, a resumed run
equals an uninterrupted one, and bad input is refused in one line with nothing written."""

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

from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

SMALL = {"nsamples": 8, "seqlen": 32, "block_batch": 2, "holdout": 2, "block_epochs": 3, "distill_seqlen": 32}


def _pruned_pair(tiny_dirs, arch: str, sparsity: float = 0.5):
    from prunelab.pruning import PruneConfig, prune
    from prunelab.storage import load

    teacher, student = load(str(tiny_dirs[arch])), load(str(tiny_dirs[arch]))
    result = prune(student, PruneConfig(method="wanda", sparsity=sparsity, nsamples=8, seqlen=32))
    return student, teacher, result.masks


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])  # one per family (gpt2/bart: the CLI tests)
def test_mask_fixed_after_every_step_and_block_loss_falls(tiny_dirs, arch, monkeypatch):
    from prunelab.recovery import MaskGuard, RecoveryConfig, masks_from_zeros, recover

    student, teacher, masks = _pruned_pair(tiny_dirs, arch)
    before = _weights(student)
    checks: list[int] = []
    apply = MaskGuard.apply

    def checked_apply(self):  # after every optimizer step: no pruned entry may be non-zero
        apply(self)
        checks.append(self.nonzero_pruned())

    monkeypatch.setattr(MaskGuard, "apply", checked_apply)
    mode = "block" if arch == "t5" else "block+distill"
    result = recover(student, teacher, RecoveryConfig(mode=mode, tokens=256, **SMALL), masks=masks)
    assert len(checks) > 10 and set(checks) == {0}
    after = masks_from_zeros(student)
    assert all(torch.equal(after[n], masks[n]) for n in masks)  # same zeros, none refilled, none added
    assert result.zeros_before == result.zeros_after == sum(int((~m).sum()) for m in masks.values())
    blocks = result.stages["block"]["blocks"]
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks)
    assert sum(b["loss_after"] for b in blocks) < sum(b["loss_before"] for b in blocks)
    changed = [k for k in before if not torch.equal(before[k], student.model.state_dict()[k])]
    assert changed, "recovery trained nothing"


def test_without_the_guard_training_refills_the_zeros(tiny_dirs, monkeypatch):
    """The guard is what keeps the mask: with it disabled the same run refills pruned weights."""
    from prunelab.recovery import MaskGuard, RecoveryConfig, recover
    from prunelab.recovery.masks import MaskError

    student, teacher, masks = _pruned_pair(tiny_dirs, "llama")
    monkeypatch.setattr(MaskGuard, "apply", lambda self: None)
    monkeypatch.setattr(MaskGuard, "mask_grads", lambda self: None)
    with pytest.raises(MaskError, match="no longer zero"):
        recover(student, teacher, RecoveryConfig(mode="block", **SMALL), masks=masks)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_distillation_lowers_its_loss(tiny_dirs, arch):
    from prunelab.recovery import RecoveryConfig, recover

    student, teacher, masks = _pruned_pair(tiny_dirs, arch, 0.7)
    cfg = RecoveryConfig(mode="distill", tokens=32 * 4 * 30, distill_lr=1e-3, **SMALL)
    curve = recover(student, teacher, cfg, masks=masks).stages["distill"]["loss_curve"]
    first, last = sum(v for _, v in curve[:5]) / 5, sum(v for _, v in curve[-5:]) / 5
    assert last < 0.8 * first


def test_block_target_dense_beats_local_on_the_last_block_input(tiny_dirs):
    """Both targets run; `dense` ends closer to the dense model's output (it corrects upstream drift)."""
    from prunelab.data.calibration import calibration_inputs
    from prunelab.pruning import PruneConfig
    from prunelab.recovery import RecoveryConfig, recover

    out = {}
    for target in ("dense", "local"):
        student, teacher, masks = _pruned_pair(tiny_dirs, "llama", 0.7)
        recover(student, teacher, RecoveryConfig(mode="block", target=target, **SMALL), masks=masks)
        calib = calibration_inputs(student, PruneConfig(nsamples=8, seqlen=32, seed=3))
        with torch.no_grad():
            errs = [float((student.model(**c).logits - teacher.model(**c).logits).pow(2).mean()) for c in calib]
        out[target] = sum(errs)
    assert out["dense"] < out["local"]


def test_resume_equals_uninterrupted(tiny_dirs, tmp_path):
    """An interrupted distillation resumed from its checkpoint ends with the uninterrupted run's weights."""
    from prunelab.recovery import RecoveryConfig, recover

    cfg = dict(mode="block+distill", tokens=32 * 2 * 12, distill_batch=2, checkpoint_every_s=1e-6, **SMALL)
    student, teacher, masks = _pruned_pair(tiny_dirs, "llama")
    recover(student, teacher, RecoveryConfig(**cfg), masks=masks)
    reference = _weights(student)

    class Killed(Exception):
        pass

    def die_at_step_7(message, done, total):
        if message.startswith("distill: loss") and done == 7:
            raise Killed

    state = tmp_path / "state"
    student, teacher, masks = _pruned_pair(tiny_dirs, "llama")
    with pytest.raises(Killed):
        recover(student, teacher, RecoveryConfig(**cfg), masks=masks, state_dir=state, progress=die_at_step_7)
    assert json.loads((state / "distill" / "state.json").read_text())["step"] == 6
    student, teacher, masks = _pruned_pair(tiny_dirs, "llama")  # a fresh process would start from the pruned model
    result = recover(student, teacher, RecoveryConfig(**cfg), masks=masks, state_dir=state)
    assert result.resumed == ["block", "distill@6"]
    resumed = _weights(student)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def _recover_cmd(pruned: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prunelab.cli", "recover", str(pruned), "--teacher", str(teacher), "--out", str(out),
            "--nsamples", "8", "--seqlen", "32", *extra]


def test_kill_minus_9_then_resume_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch, capsys):
    """`prunelab recover` killed with SIGKILL mid-distillation resumes from its last checkpoint."""
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--nsamples", "8",
                         "--seqlen", "32", "--out", str(pruned))
    assert code == 0, text
    args = ["--mode", "distill", "--tokens", str(256 * 512), "--checkpoint-every", "0.000001"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_recover_cmd(pruned, tiny_dirs["llama"], tmp_path / "ref", *args), check=True, env=env,
                   capture_output=True)
    out = tmp_path / "resumed"
    state = tmp_path / ".resumed.recovery" / "distill" / "state.json"
    proc = subprocess.Popen(_recover_cmd(pruned, tiny_dirs["llama"], out, *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(_recover_cmd(pruned, tiny_dirs["llama"], out, *args), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed distill@" in done.stdout
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".resumed.recovery").exists()  # the state goes once the output is written


def test_prune_recover_then_quantize(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "sparsegpt", "--nsamples",
                         "8", "--seqlen", "32", "--recover", "block", "--quant", "int8", "--out", str(out))
    assert code == 0, text
    assert "recovery block: 2 blocks" in text and "pruned weights still zero" in text
    report = json.loads((out / "prune_report.json").read_text())
    rec = report["recovery"]
    assert rec["zeros_before"] == rec["zeros_after"] == rec["pruned_entries"]
    assert report["quantization"]["after_recovery"] and report["quantization"]["gptq"] == 14
    assert report["config"]["quant"] == "int8" and all(m["zeros"] >= m["pruned"] for m in report["matrices"])
    assert rec["stages"]["block"]["calibration"]["nsamples"] == 8 and rec["peak_rss_bytes"] > 0


def test_recover_command_reads_the_mask_from_zeros(tiny_dirs, tmp_path, monkeypatch, capsys):
    from prunelab.recovery import masks_from_zeros
    from prunelab.storage import load

    pruned = tmp_path / "pruned"
    run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["gpt2"]), "--method", "magnitude", "--out", str(pruned))
    out = tmp_path / "rec"
    code, text = run_cli(monkeypatch, capsys, "recover", str(pruned), "--teacher", str(tiny_dirs["gpt2"]), "--out",
                         str(out), "--nsamples", "8", "--seqlen", "32")
    assert code == 0, text
    a, b = masks_from_zeros(load(str(pruned))), masks_from_zeros(load(str(out)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["pruned_with"]["method"] == "magnitude" and report["recovery"]["stages"]["block"]["blocks"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--teacher", "OTHER_ARCH"], "different architectures"),
        (["--mode", "distill", "--tokens", "0"], "positive number of tokens"),
        (["--mode", "distill", "--data", "WIKI_TEST"], "WikiText-2 test evaluation split"),
        (["--calib", "WIKI_TEST"], "WikiText-2 test evaluation split"),
        (["--mode", "nope"], "unknown --recover"),
        (["--teacher", "/nonexistent/dense"], "/nonexistent/dense"),
    ],
)
def test_recover_bad_input(tiny_dirs, tmp_path, monkeypatch, capsys, data_dir, extra, fragment):
    pruned = tmp_path / "pruned"
    run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "magnitude", "--out", str(pruned))
    subs = {"OTHER_ARCH": str(tiny_dirs["gpt2"]), "WIKI_TEST": str(data_dir / "wikitext-2-raw" / "wiki.test.raw")}
    args = ["--teacher", str(tiny_dirs["llama"]), *[subs.get(e, e) for e in extra]]
    if args.count("--teacher") > 1:
        args = args[2:]
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "recover", str(pruned), "--out", str(out), *args)
    assert code == 2, text
    assert fragment in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recover_refuses_a_different_vocabulary(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunelab.errors import ConfigError
    from prunelab.recovery import check_pair
    from prunelab.storage import load

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(tmp_path / "bigger")
    for f in Path(tiny_dirs["llama"]).glob("tokenizer*"):
        (tmp_path / "bigger" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="vocabulary"):
        check_pair(load(str(tiny_dirs["llama"])), load(str(tmp_path / "bigger")))


def test_recover_is_a_study_axis(tmp_path, tiny_dirs, small_text):
    from prunelab.study import Store, load_config, plan, run_study

    cfg = {"models": [str(tiny_dirs["llama"])], "methods": ["wanda"], "sparsities": [0.5], "benchmarks": ["ppl"],
           "recover": ["none", "block"], "analyze": False, "size": False, "speed": False,
           "calibration": {"nsamples": 4, "seqlen": 32, "calib": str(small_text)},
           "eval": {"ppl": {"seqlen": 64, "max_tokens": 512, "data": str(small_text)}}}
    labels = {c.method_label for c in plan(load_config(cfg)) if c.kind == "prune"}
    assert labels == {"wanda", "wanda +block"}
    summary = run_study(cfg, tmp_path / "study", progress=False)
    assert summary.failed == 0, summary.failures
    with Store(tmp_path / "study") as store:
        rows = [r for r in store.rows() if r.kind == "bench" and r.method == "wanda"]
    assert {r.method_label for r in rows} == {"wanda", "wanda +block"}
    assert all(r.status == "done" and r.metrics["value"] > 0 for r in rows)


@pytest.mark.parametrize("spec, fragment", [("distill", "token budget"), ("block+distill:x", "as a number"),
                                            ("fast", "unknown --recover")])
def test_study_recover_spec_errors(tiny_dirs, spec, fragment):
    from prunelab.errors import ConfigError
    from prunelab.study import load_config

    with pytest.raises(ConfigError, match=fragment):
        load_config({"models": [str(tiny_dirs["llama"])], "methods": ["wanda"], "recover": ["none", spec]})


def test_prune_recover_refuses_an_evaluation_split_as_calibration(tiny_dirs, tmp_path, monkeypatch, capsys,
                                                                  data_dir):
    out = tmp_path / "out"
    wiki = str(data_dir / "wikitext-2-raw" / "wiki.test.raw")
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "wanda", "--nsamples", "4",
                         "--seqlen", "32", "--calib", wiki, "--recover", "block", "--out", str(out))
    assert code == 2 and "WikiText-2 test evaluation split" in text, text
    assert not out.exists()
