#!/usr/bin/env python3
"""The speed benchmark: `python scripts/bench.py [--quick] [--write]` (the same as `charrnn bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charrnn.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
