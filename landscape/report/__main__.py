"""``python -m landscape.report PATH``: as ``landscape report PATH`` (see :func:`landscape.report.main`).

Example:
    >>> import landscape.report.__main__ as entry
    >>> entry.main.__module__
    'landscape.report.writer'
"""

import sys

from .writer import main

if __name__ == "__main__":
    sys.exit(main())
