"""Studies: published numbers as data, study files, launchers and tables (issue 24).

They drive runs through the run directory and never reach inside the engine.
"""

from contrastlab.studies.published import METRICS, PublishedRow, row, rows, tables

__all__ = ["METRICS", "PublishedRow", "row", "rows", "tables"]
