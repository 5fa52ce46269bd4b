"""Studies: a grid of models × methods × patterns × sparsities × benchmarks, resumable, in SQLite."""

from prunelab.study.cells import Cell
from prunelab.study.config import PRESETS, StudyConfig, load_config, plan
from prunelab.study.runner import StudySummary, run_study
from prunelab.study.store import Row, Store, export_csv

__all__ = ["PRESETS", "Cell", "Row", "Store", "StudyConfig", "StudySummary", "export_csv", "load_config", "plan",
           "run_study"]
