"""Weight-magnitude structure of a checkpoint, streamed from safetensors without loading the model."""

from prunelab.analysis.core import OUTPUT_FILES, analyze, build_stats, plan, scan
from prunelab.analysis.stats import EDGES, EDGES_LOG10, QUANTILES, THRESHOLDS, Summary, merged, summarize

__all__ = [
    "EDGES", "EDGES_LOG10", "OUTPUT_FILES", "QUANTILES", "THRESHOLDS", "Summary", "analyze", "build_stats",
    "merged", "plan", "scan", "summarize",
]
