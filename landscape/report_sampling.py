"""Re-export of :mod:`landscape.report.sampling` (the report's sampling-error section), its old path.

Example:
    >>> import landscape.report_sampling as old, landscape.report.sampling as new
    >>> old.config_rows is new.config_rows
    True
"""

from .report.sampling import COLUMNS, config_rows, model_rows, section, write_csv

__all__ = ["COLUMNS", "config_rows", "model_rows", "section", "write_csv"]
