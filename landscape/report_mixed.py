"""Re-export of :mod:`landscape.report.mixed` (the report's mixed-precision section), its old path.

Example:
    >>> import landscape.report_mixed as old, landscape.report.mixed as new
    >>> old.budget_table is new.budget_table
    True
"""

from .report.mixed import budget_table, mixed_rows, section, table_html

__all__ = ["budget_table", "mixed_rows", "section", "table_html"]
