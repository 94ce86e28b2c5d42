"""Redis memory per stored interaction, for sizing the shared history store (SCALING.md).

    python -m benchmarks.redis_memory [--users 2000] [--lengths 20,100,160,500]

Starts a real ``redis-server`` on loopback (Debian's), writes ``--users`` histories of each
length in the layout of :class:`~orchestrator.store.RedisHistoryStore` (per user a sorted set
``h:<user>`` of ``"<movie>:<timestamp>"`` scored by time, and a hash ``r:<user>`` of ratings;
checked by reading some users back through the store itself), and reports ``used_memory``
growth per interaction and per user. Length matters: Redis keeps a small sorted set or hash
(up to 128 entries by default) as one compact listpack and a larger one as a skiplist plus a
dict, several times the bytes per entry.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPORTS, conditions, conditions_line, log, write_json


def measure(users: int, lengths: list[int], seed: int = 0) -> list[dict]:
    """``used_memory`` growth per interaction for ``users`` histories of each length."""
    import redis

    from benchmarks.scaleout import start_redis, stop
    from orchestrator.store import RedisHistoryStore

    workdir = Path(tempfile.mkdtemp(prefix="recsys-redis-memory-"))
    proc, url = start_redis(workdir)
    rng = random.Random(seed)
    rows = []
    try:
        client = redis.Redis.from_url(url)
        store = RedisHistoryStore(url, prefix="recsys:")
        first_user = 1
        for length in lengths:
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            pipe = client.pipeline(transaction=False)
            for user in range(first_user, first_user + users):
                ts0 = 900_000_000 + rng.randrange(10**8)
                movies = rng.sample(range(1, 90_000), length)
                members = {f"{m}:{ts0 + 60 * i}": ts0 + 60 * i for i, m in enumerate(movies)}
                pipe.zadd(f"recsys:h:{user}", members)
                pipe.hset(f"recsys:r:{user}", mapping={k: float(rng.choice((0.0, 0.5, 3.0, 4.5, 5.0))) for k in members})
                if user % 200 == 0:
                    pipe.execute()
            pipe.execute()
            after = int(client.info("memory")["used_memory"])
            for user in (first_user, first_user + users - 1):  # the store reads what was written
                assert len(store.history(user)) == length, (user, length)
            per_user = (after - before) / users
            rows.append(
                {
                    "history_length": length,
                    "users": users,
                    "bytes_per_user": round(per_user),
                    "bytes_per_interaction": round(per_user / length, 1),
                }
            )
            log(f"length {length}: {per_user / length:.1f} B per interaction, {per_user / 1024:.1f} KiB per user")
        store.close()
        client.close()
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=2000, help="histories per length (default: %(default)s)")
    p.add_argument("--lengths", default="20,100,160,500", help="history lengths (default: %(default)s)")
    p.add_argument("--out", default=str(REPORTS / "redis_memory.json"))
    args = p.parse_args(argv)
    try:
        rows = measure(args.users, [int(x) for x in args.lengths.split(",")])
    except RuntimeError as exc:
        print(f"redis_memory: {exc}", file=sys.stderr)
        return 2
    cond = conditions(users_per_length=args.users)
    out = write_json(args.out, {"conditions": cond, "rows": rows})
    print(json.dumps(rows, indent=2))
    print(conditions_line(cond))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
