"""Report: draw figures from DataFrames and write CSV tables and a self-contained index.html.

Nothing here computes a metric: analyses produce tables, this package only draws and writes them.
"""

from loopscope.report.document import Figure, Report, Section, Table

__all__ = ["Figure", "Report", "Section", "Table"]
