"""`prunelab prune --method structured` end to end: a smaller dense checkpoint and an honest report."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from prunelab.cli import app


def test_cli_structured_writes_a_smaller_model_and_reports_it(tiny_dirs, tmp_path):
    out = tmp_path / "shrunk"
    result = CliRunner().invoke(app, [
        "prune", str(tiny_dirs["llama"]), "--method", "structured", "--sparsity", "0.25",
        "--structured-target", "mlp", "--nsamples", "2", "--seqlen", "16", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune_report.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    small = AutoModelForCausalLM.from_pretrained(str(out))
    n_dense = sum(p.numel() for p in dense.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    # 25 % of 128 neurons = 32 per layer; each neuron has gate row + up row + down column of width 64.
    assert n_dense - n_small == 2 * 32 * 3 * 64
    assert report["structured"]["params_removed"] == n_dense - n_small
    assert small.config.intermediate_size == 96


def test_cli_structured_rejects_unknown_target(tiny_dirs, tmp_path):
    result = CliRunner().invoke(app, [
        "prune", str(tiny_dirs["llama"]), "--method", "structured", "--structured-target", "rows",
        "--out", str(tmp_path / "x"),
    ])
    assert result.exit_code != 0
    assert not (tmp_path / "x").exists()
