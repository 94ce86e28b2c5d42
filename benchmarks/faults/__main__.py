"""``python -m benchmarks.faults``: the same as ``recsys bench faults``."""

import sys

from benchmarks.faults.run import main

sys.exit(main())
