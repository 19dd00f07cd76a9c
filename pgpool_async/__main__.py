"""``python -m pgpool_async demo``: see :mod:`pgpool_async.demo`."""

from __future__ import annotations

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())
