"""Report: figures (matplotlib Agg) and the Markdown / self-contained HTML study report."""

from prunelab.report.report import build_report

__all__ = ["build_report"]
