"""Studies: a grid of models × methods × patterns × sparsities × benchmarks, resumable, in SQLite."""

from prunelab.study.cells import Cell
from prunelab.study.config import PRESETS, StudyConfig, load_config, plan
from prunelab.study.results import BenchOutcome, CellResult, Sizes, SpeedOutcome
from prunelab.study.runner import Executor, StudySummary, run_study
from prunelab.study.store import Row, Store, export_csv

__all__ = ["PRESETS", "BenchOutcome", "Cell", "CellResult", "Executor", "Row", "Sizes", "SpeedOutcome", "Store",
           "StudyConfig", "StudySummary", "export_csv", "load_config", "plan", "run_study"]
