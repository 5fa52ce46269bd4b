"""`prunelab prune`: output directory, report contents, one-line errors with no partial output."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli


def test_prune_writes_checkpoint_and_report(tiny_dirs, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["gpt2"]), "--method", "wanda", "--sparsity", "0.9",
                      "--nsamples", "4", "--seqlen", "32", "--seed", "7", "--out", str(out))
    assert code == 0, text
    assert "90.00% of prunable weights zero" in text
    report = json.loads((out / "prune_report.json").read_text())
    assert report["model"] == str(tiny_dirs["gpt2"]) and report["method"] == "wanda"
    assert report["pattern"] == "unstructured" and report["config"]["seed"] == 7
    assert report["requested_sparsity"] == 0.9 and abs(report["achieved_sparsity_prunable"] - 0.9) < 1e-3
    assert report["calibration"]["nsamples"] == 4 and len(report["calibration"]["source_sha256"]) == 64
    assert report["wall_time_s"] > 0 and report["peak_rss_bytes"] > 0
    assert len(report["matrices"]) == 8 and all(m["pruned"] == round(0.9 * m["numel"]) for m in report["matrices"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    w = model.transformer.h[0].mlp.c_fc.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--sparsity", "1.0"], "outside [0, 1)"),
        (["--sparsity", "-0.5"], "outside [0, 1)"),
        (["--pattern", "4:4"], "0 < N < M"),
        (["--pattern", "2:x"], "unknown pattern"),
        (["--method", "nope"], "unknown method"),
        (["--calib", "/nonexistent/calib.txt"], "not found"),
        (["--calib", "SHORT"], "only 3 tokens"),
        (["--format", "zip"], "unknown --format"),
    ],
)
def test_prune_bad_input(tiny_dirs, tmp_path, monkeypatch, capsys, extra, fragment):
    short = tmp_path / "short.txt"
    short.write_text("ab", encoding="utf-8")
    extra = [str(short) if e == "SHORT" else e for e in extra]
    out = tmp_path / "out"
    code, text = run_cli(monkeypatch, capsys, "prune", str(tiny_dirs["llama"]), "--method", "sparsegpt",
                      "--nsamples", "2", "--seqlen", "16", *extra, "--out", str(out))
    assert code != 0
    flat = " ".join(text.split())  # rich wraps long lines at the terminal width
    assert fragment in flat and flat.startswith("error:") and flat.count("error:") == 1, text
    assert "Traceback" not in text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_prune_no_prunable_matrices(tmp_path, monkeypatch, capsys):
    """A model whose linears are not inside numbered blocks has nothing to prune."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=16, n_layer=0, n_head=2, n_positions=32, vocab_size=50,
                     architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "empty")
    code, text = run_cli(monkeypatch, capsys, "prune", str(tmp_path / "empty"), "--method", "magnitude",
                      "--out", str(tmp_path / "out"))
    assert code == 2 and "no prunable matrices" in text
    assert not (tmp_path / "out").exists()
