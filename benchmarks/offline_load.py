"""Loader throughput on an ML-32M-shaped ratings.csv, printed with its conditions.

    python -m benchmarks.offline_load --data /tmp/ml32m-synth   # after `recsys data synth --out /tmp/ml32m-synth`

Target (issue #2): a 32M-row ratings.csv is read and validated in <= 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

from export.data import load_movielens
from export.pipeline import git_sha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens-layout folder")
    args = parser.parse_args()
    t0 = time.perf_counter()
    ml = load_movielens(args.data, progress=True)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        json.dumps(
            {
                "conditions": {
                    "git_sha": git_sha(),
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "data": args.data,
                },
                "ratings": ml.n_ratings,
                "movies": len(ml.movies),
                "dropped": ml.report.dropped,
                "load_seconds": round(seconds, 1),
                "peak_rss_gib": round(peak_gib, 2),
                "target_met": seconds <= 120,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
