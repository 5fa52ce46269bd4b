"""The headline rule on hand-built numbers and on a hand-built results store with known answers."""

from __future__ import annotations

import math
from pathlib import Path

from prunelab.report import build_report
from prunelab.report.answer import buys_table, headline_table
from prunelab.report.headline import Measure, Reach, indistinguishable, reach, within
from prunelab.report.intervals import Interval
from prunelab.study import Cell, CellResult, Sizes, Store


def _m(value: float, low: float | None = None, high: float | None = None) -> Measure:
    return Measure(value, None if low is None else Interval(low, high, "test"))


def test_within_uses_the_pessimistic_end_and_dense_point():
    dense = _m(0.80, 0.75, 0.85)
    assert within(_m(0.80, 0.79, 0.81), dense, 0.05, True)  # 0.79 >= 0.80 - 0.04
    assert not within(_m(0.80, 0.70, 0.90), dense, 0.05, True)  # same point, too wide to show it
    assert within(_m(20.5, 20.0, 20.9), _m(20.0), 0.05, False)  # ppl: upper end 20.9 <= 21
    assert not within(_m(20.5, 20.0, 21.2), _m(20.0), 0.05, False)
    assert within(_m(0.80), _m(0.80), 0.0, True)  # without intervals: point estimates


def test_indistinguishable_is_interval_overlap():
    assert indistinguishable(_m(0.69, 0.57, 0.79), _m(0.61, 0.49, 0.72))  # "rises" above dense: still noise
    assert not indistinguishable(_m(0.40, 0.30, 0.48), _m(0.61, 0.49, 0.72))


def test_reach_walks_up_and_stops_at_the_first_failure():
    dense = _m(0.9, 0.88, 0.92)
    points = {0.1: _m(0.9, 0.89, 0.91), 0.5: _m(0.85, 0.80, 0.89), 0.9: _m(0.5, 0.4, 0.6), 0.95: _m(0.9, 0.89, 0.91)}
    assert reach(points, dense, 0.05, True) == Reach(0.1, 0.5)  # 0.95's good value sits above a failure
    assert reach(points, dense, 0.05, True).text() == "0.1 (≤ 0.5 within noise)"
    assert reach({0.1: None, 0.5: _m(0.9, 0.89, 0.91)}, dense, 0.05, True) == Reach(None, None)  # failed cell
    assert Reach(None, None).text() == "none" and Reach(0.5, 0.5).text() == "0.5"
    assert Reach(None, 0.9).text() == "none (≤ 0.9 within noise)"


def _finish(store: Store, cell: Cell, cells: list[Cell], **result) -> None:
    cells.append(cell)
    store.mark_running(cell)
    store.finish(cell, CellResult("done", **result))


def _acc(correct: int, n: int = 1000) -> dict:
    return {"value": correct / n, "primary": "accuracy", "higher_is_better": True, "status": "ok",
            "details": {"interval_data": {"kind": "binomial", "units": "examples", "correct": correct, "n": n},
                        "majority_baseline": 0.55, "num_classes": 2}}


def _ppl(value: float) -> dict:
    """Ten identical 100-token units: the bootstrap interval collapses onto the value."""
    nll = math.log(value) * 100
    return {"value": value, "primary": "ppl", "higher_is_better": False, "status": "ok",
            "details": {"interval_data": {"kind": "ratio", "units": "blocks", "transform": "exp",
                                          "num": [nll] * 10, "den": [100] * 10}}}


def hand_built_store(out: Path) -> None:
    """Known answers (Wilson 95 % on n = 1000; dense 900/1000 → [0.880, 0.917]):

    sst2 magnitude: 0.1 → 898 [0.878, 0.915]: within 5 % and 10 % (low ≥ 0.855 / 0.81), not 1 % (0.891), overlaps;
                    0.5 → 870 [0.848, 0.889]: within 10 % only, overlaps dense; 0.9 → 600: nothing.
    sst2 wanda: 0.1 → 500/1000: no sparsity qualifies, no overlap.
    ppl magnitude (dense 20, intervals of zero width): 0.5 → 20.5 within 5 % (≤ 21), not 1 %; 0.9 → 30 fails.
    """
    cells: list[Cell] = []
    with Store(out) as store:
        _finish(store, Cell("bench", "zoo:enc", bench="sst2"), cells, metrics=_acc(900))
        for s, correct in ((0.1, 898), (0.5, 870), (0.9, 600)):
            _finish(store, Cell("bench", "zoo:enc", method="magnitude", sparsity=s, bench="sst2"), cells,
                    metrics=_acc(correct))
        _finish(store, Cell("bench", "zoo:enc", method="wanda", sparsity=0.1, bench="sst2"), cells,
                metrics=_acc(500))
        _finish(store, Cell("bench", "zoo:dec", bench="ppl"), cells, metrics=_ppl(20.0))
        for s, v in ((0.5, 20.5), (0.9, 30.0)):
            _finish(store, Cell("bench", "zoo:dec", method="magnitude", sparsity=s, bench="ppl"), cells,
                    metrics=_ppl(v))
            _finish(store, Cell("size", "zoo:dec", method="magnitude", sparsity=s), cells,
                    sizes=Sizes(dense_bytes=400_000_000, sparse_bytes=int(400_000_000 * (1.1 - s))))
        speed = {"settings": {"prefill_tokens": 64}, "memory": {"weights_bytes": {"dense": 4e8, "sparse": 2.5e8}},
                 "speed": {"dense": {"decode_ms_per_token": 20.0, "decode_s_per_token_runs": [0.019, 0.020, 0.022]},
                           "sparse": {"decode_ms_per_token": 15.0,
                                      "decode_s_per_token_runs": [0.014, 0.015, 0.017]}}}
        _finish(store, Cell("speed", "zoo:dec", method="magnitude", sparsity=0.5), cells, metrics=speed)
        store.set_meta(config={"preset": "quick", "models": ["zoo:dec", "zoo:enc"]}, plan=[c.hash for c in cells],
                       executor="local")


def test_headline_on_a_hand_built_store(tmp_path):
    hand_built_store(tmp_path)
    with Store(tmp_path) as store:
        rows = store.plan_rows()
    header, body, named = headline_table(rows, ["zoo:dec", "zoo:enc"])
    assert header[-3:] == ["within 1%", "within 5%", "within 10%"]
    got = {(r[0], r[1], r[2]): r[4:] for r in body}
    assert got[("zoo:enc", "magnitude", "sst2")] == ["none (≤ 0.5 within noise)", "0.1 (≤ 0.5 within noise)", "0.5"]
    assert got[("zoo:enc", "wanda", "sst2")] == ["none", "none", "none"]
    assert got[("zoo:dec", "magnitude", "ppl")] == ["none", "0.5", "0.5"]
    dense_cell = next(r[3] for r in body if r[2] == "sst2")
    assert dense_cell == "0.9 [0.8798, 0.9171]"
    assert named["zoo:dec"] == {("magnitude", 0.5, "unstructured")}
    b_header, b_body = buys_table(rows, ["zoo:dec", "zoo:enc"], named)
    lines = {(r[0], r[1], r[2]): dict(zip(b_header, r, strict=True)) for r in b_body}
    point = lines[("zoo:dec", "magnitude", "0.5")]
    assert point["size on disk"] == "240.0 MB" and point["vs dense checkpoint"] == "0.60×"
    assert point["memory"] == "250.0 MB (weights in memory)"
    assert point["speed (pruned)"] == "15 ms/tok (14–17, 3 runs)"
    assert point["speed (dense, same cell)"] == "20 ms/tok (19–22, 3 runs)"
    assert lines[("zoo:enc", "magnitude", "0.1")]["speed (pruned)"] == "not measured"
    assert lines[("zoo:enc", "magnitude", "0.1")]["size on disk"] == "not measured"


def test_report_opens_with_the_headline(tmp_path):
    hand_built_store(tmp_path)
    paths = build_report(tmp_path)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    assert md.index("## Headline") < md.index("## Summary") < md.index("## zoo:dec")
    assert html.index("<h2>Headline</h2>") < html.index("<h2>Summary</h2>") < html.index("<h2>zoo:dec</h2>")
    assert "| zoo:enc | wanda | sst2 | 0.9 [0.8798, 0.9171] | none | none | none |" in md
    assert "pessimistic end of its 95 % interval" in md and "pessimistic end of its 95 % interval" in html
    assert "majority class" in md and "chance" in md  # the accuracy figure's caption names its baselines
