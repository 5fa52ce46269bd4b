"""Registry, defaults, the result JSON, and bad input through `prunelab eval` (exit 2, one line)."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli
from prunelab.evaluation import BENCHMARKS, default_benchmarks
from prunelab.storage import load

REQUIRED = {"model", "family", "bench", "metrics", "primary", "value", "n_tokens", "n_examples", "seqlen", "seed",
            "wall_time_s", "data_sha256", "status", "note"}


pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")



def test_registry_targets_import_and_cover_the_contract():
    for name in ("ppl", "seq2seq-ppl", "pppl", "embed", "sst2", "mrpc"):
        spec = BENCHMARKS[name]
        assert callable(spec.load()) and spec.families and spec.description


def test_default_benchmarks(tiny_dirs):
    assert default_benchmarks("decoder") == ["ppl", "sst2"]
    assert default_benchmarks("encoder") == ["sst2", "mrpc", "embed"]
    assert default_benchmarks("encoder-decoder") == ["seq2seq-ppl"]
    assert default_benchmarks(load(str(tiny_dirs["bart"]))) == ["seq2seq-ppl"]

    class Speech:
        family = "encoder-decoder"
        is_speech = True  # what LoadedModel says when it has a feature extractor

    assert default_benchmarks(Speech()) == ["asr"]


def test_cli_eval_writes_results_json(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    code, text = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["gpt2"]), "--bench", "ppl", "--bench", "sst2",
                         "--max-tokens", "256", "--train-limit", "60", "--max-examples", "30", "--seed", "3",
                         "--out", str(out))
    assert code == 0, text
    payload = json.loads(out.read_text())
    assert payload["family"] == "decoder" and [r["bench"] for r in payload["results"]] == ["ppl", "sst2"]
    for r in payload["results"]:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["seed"] == 3 and r["model"] == str(tiny_dirs["gpt2"]) and r["wall_time_s"] > 0
    assert payload["results"][0]["n_tokens"] == 2 * 127 and payload["results"][1]["n_examples"] == 30


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--bench", "nope"], "unknown bench 'nope'"),
        (["--bench", "pppl"], "does not apply to decoder models"),
        (["--bench", "seq2seq-ppl"], "does not apply to decoder models"),
        (["--bench", "ppl", "--seqlen", "4096"], "exceeds the model context of 128"),
        (["--bench", "ppl", "--data", "/nonexistent/wiki.raw"], "not found"),
        (["--bench", "sst2", "--data", "/nonexistent/glue"], "not found"),
        (["--bench", "ppl", "--mode", "bogus"], "unknown --mode"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tiny_dirs, tmp_path, monkeypatch, capsys, extra, fragment):
    out = tmp_path / "x.json"
    code, text = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["gpt2"]), *extra, "--out", str(out))
    assert code == 2
    assert fragment in " ".join(text.split())  # rich may wrap the line on a narrow terminal
    assert "Traceback" not in text and not out.exists()


def test_cli_empty_dataset(tiny_dirs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.raw"
    empty.write_text(" \n\n")
    code, text = run_cli(monkeypatch, capsys, "eval", str(tiny_dirs["gpt2"]), "--bench", "ppl", "--data", str(empty),
                         "--out", str(tmp_path / "x.json"))
    assert code == 2 and "is empty" in " ".join(text.split())
