"""Scale-out on loopback (issue #14): 2 orchestrators + 2 Tritons, one Redis, one HAProxy.

    recsys bench scaleout [--artifacts DIR --repo DIR] [--out FILE] [--phase-s S] [--concurrency N]

Everything is a real process bound to 127.0.0.1: a ``redis-server`` (Debian's) holds the
shared history; two replicas, each an embedded Triton (``recsys triton``) and an orchestrator
(``recsys serve --triton-url``, ``RECSYS_HISTORY_STORE=redis``); HAProxy (Debian's) in front.

Why HAProxy: gRPC is HTTP/2, one long-lived connection per client, so a layer-4 balancer
pins a client to one replica. HAProxy in ``mode http`` with HTTP/2 on both sides balances
each call (each HTTP/2 stream) on its own, health-checks the replicas and redispatches a
call whose connection to a dead replica was refused. It is one ``apt-get install`` here and
the same role an Ingress / Envoy plays in Kubernetes. gRPC's client-side ``round_robin``
(:mod:`clients.channel`) needs every client to know every replica; a balancer keeps one
address for all clients.

The client is :class:`~clients.client.AsyncRecsysClient` with its own retries off and the
retry policy in the channel's gRPC service config (:func:`clients.channel.channel_options`):
UNAVAILABLE is re-sent by gRPC. It drives Recommend (known users and explicit histories)
and RecordInteraction (fresh users, explicit timestamps: idempotent, so a retried write is
stored once) at a fixed concurrency through four phases:

``steady``               both replicas up;
``orchestrator_killed``  orchestrator 0 SIGKILLed, down ``--down-s``, restarted on its port,
                         until its health is SERVING again;
``triton_killed``        Triton 1 SIGKILLed (orchestrator 1 answers the popular fallback),
                         down ``--down-s``, restarted, until every model is READY again;
``recovered``            both replicas up again.

Afterwards: every acknowledged write is looked up in Redis, and for a few fresh users an
interaction recorded directly on one orchestrator must be seen by the other (its
RecordInteraction's ``history_length`` counts both; its Recommend excludes the movie).

Output (``--out``), exactly these keys: ``orchestrators``, ``tritons``, ``balancer`` (what,
version, how), ``requests`` (calls made), ``failed`` (calls that did not get OK), ``killed``
(what was SIGKILLed, when, how long the restart took), ``history_consistent``, ``qps`` (per
phase). Conditions and details go to stderr. Exit code 0 only when ``failed`` is 0 and the
history is consistent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPORTS,
    LoadWatch,
    conditions,
    conditions_line,
    log,
    write_json,
)
from export import DEFAULT_DATA_DIR

PHASES = ("steady", "orchestrator_killed", "triton_killed", "recovered")
REPORT_KEYS = ("orchestrators", "tritons", "balancer", "requests", "failed", "killed", "history_consistent", "qps")
REPLICAS = 2


@dataclass(frozen=True)
class ScaleoutSettings:
    """What one run does.

    Attributes:
        concurrency: Calls in flight through the balancer.
        phase_s: Length of the ``steady`` and ``recovered`` phases.
        down_s: How long a killed process stays down before its restart.
        write_share: Share of calls that are RecordInteraction (the rest Recommend).
        history_share: Share of Recommend calls that send an explicit history.
        call_timeout_s: Deadline of each call (retries included).
        consistency_users: Fresh users of the cross-replica check.
        retry_policy: Give the client channel the retry service config; False is the control
            run that shows what the policy hides (calls failing while a replica dies).
        seed: Workload randomness.
    """

    concurrency: int = 16
    phase_s: float = 20.0
    down_s: float = 3.0
    write_share: float = 0.2
    history_share: float = 0.2
    call_timeout_s: float = 10.0
    consistency_users: int = 20
    retry_policy: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.concurrency < 1 or self.consistency_users < 1:
            problems.append("concurrency and consistency_users must be >= 1")
        if not (self.phase_s > 0 and self.down_s >= 0 and self.call_timeout_s > 0):
            problems.append("phase_s and call_timeout_s must be > 0, down_s >= 0")
        if not (0 <= self.write_share <= 1 and 0 <= self.history_share <= 1):
            problems.append("write_share and history_share must be in [0, 1]")
        if problems:
            raise ValueError("invalid scale-out settings: " + "; ".join(problems))


# ---------------------------------------------------------------------------- packaged services


def require(binary: str) -> str:
    """The path of a Debian-packaged binary, or a RuntimeError saying how to install it."""
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if Path(p).is_file()), None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: `make scaleout-deps` (apt-get install redis-server haproxy) as root")
    return path


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 15.0) -> None:
    import socket

    expires = time.monotonic() + timeout_s
    while time.monotonic() < expires:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A ``redis-server`` on a free loopback port, append-only with fsync per write (no lost acks)."""
    from orchestrator.tritonserver import free_port

    port = free_port()
    with open(workdir / "redis.log", "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                require("redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(workdir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    _wait_port(port, proc, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def haproxy_config(port: int, backends: list[str]) -> str:
    """HAProxy's configuration: HTTP/2 (cleartext, gRPC) in and out, each call balanced on its own.

    Args:
        port: The balancer's loopback port.
        backends: ``host:port`` of every orchestrator.
    """
    servers = "\n".join(f"    server orchestrator{i} {b} proto h2 check inter 500ms fall 1 rise 2" for i, b in enumerate(backends))
    return f"""\
# Generated by benchmarks/scaleout.py: gRPC (HTTP/2 cleartext) balanced per call.
global
    maxconn 4096

defaults
    mode http
    # a connection refused by a dead replica is retried on the other one (the call never
    # reached a server, so this is always safe)
    retries 3
    option redispatch
    timeout connect 1s
    timeout client 60s
    timeout server 60s

frontend grpc_in
    bind 127.0.0.1:{port} proto h2
    default_backend orchestrators

backend orchestrators
    balance roundrobin
    # TCP checks every 500 ms: a killed replica leaves the rotation after one failed check
{servers}
"""


def haproxy_version() -> str:
    out = subprocess.run([require("haproxy"), "-v"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()[:40]


def start_haproxy(workdir: Path, backends: list[str]) -> tuple[subprocess.Popen, int]:
    """HAProxy in the foreground (``-db``) on a free loopback port, in front of ``backends``."""
    from orchestrator.tritonserver import free_port

    port = free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, backends))
    check = subprocess.run([require("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected its configuration:\n{check.stdout}{check.stderr}")
    with open(workdir / "haproxy.log", "wb") as out:
        proc = subprocess.Popen([require("haproxy"), "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _wait_port(port, proc, "haproxy")
    return proc, port


def stop(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, of a process this module started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- load


Outcome = tuple[float, float, str, str]
"""``(started, ended, rpc, status)``; times are ``time.monotonic()``."""


class MixedLoad:
    """Recommend and RecordInteraction through one channel with the retry service config.

    Runs an asyncio loop in a background thread so the main thread can kill and restart
    processes; :attr:`outcomes` and :attr:`acked` are appended by that thread.

    Args:
        target: The balancer's ``host:port``.
        users: Known user ids (Recommend by id).
        movies: Catalog movie ids.
        first_fresh_user: Writes go to users from this id up (never in the seed data).
        s: Settings.
    """

    def __init__(self, target: str, users: list[int], movies: list[int], first_fresh_user: int, s: ScaleoutSettings):
        self.target = target
        self.users = users
        self.movies = movies
        self.next_user = first_fresh_user
        self.s = s
        self.rng = random.Random(s.seed)
        self.outcomes: list[Outcome] = []
        self.fallbacks = 0
        self.acked: list[tuple[int, int, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="scaleout-load", daemon=True)

    def _write(self) -> tuple[int, int, int]:
        user = self.next_user + self.rng.randrange(200)  # a few writes per fresh user
        # an explicit timestamp makes a re-sent write the same write (stored once)
        return user, self.movies[self.rng.randrange(len(self.movies))], int(time.time()) - self.rng.randrange(86_400)

    async def _worker(self, client: Any) -> None:
        from clients.errors import RecsysRpcError

        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if self.rng.random() < self.s.write_share:
                    rpc = "RecordInteraction"
                    user, movie, ts = self._write()
                    await client.record_interaction(user, movie, 4.0, ts)
                    self.acked.append((user, movie, ts))
                else:
                    rpc = "Recommend"
                    if self.rng.random() < self.s.history_share:
                        picks = self.rng.sample(self.movies, min(len(self.movies), self.rng.randint(1, 20)))
                        reply = await client.recommend(history=picks, k=10)
                    else:
                        reply = await client.recommend(self.users[self.rng.randrange(len(self.users))], k=10)
                    self.fallbacks += bool(reply.is_fallback)  # answered, by the popular fallback
                self.outcomes.append((t0, time.monotonic(), rpc, "OK"))
            except RecsysRpcError as exc:
                self.outcomes.append((t0, time.monotonic(), rpc, exc.code.name))
                if len(self.errors) < 20:
                    self.errors.append(f"{rpc}: {exc.code.name} {exc}")
            except Exception as exc:  # noqa: BLE001 - a defect of the benchmark: counted as a failure, reported
                self.outcomes.append((t0, time.monotonic(), "client", type(exc).__name__))
                self.errors.append(repr(exc))

    async def _main(self) -> None:
        import grpc

        from clients.channel import channel_options
        from clients.client import AsyncRecsysClient

        channel = grpc.aio.insecure_channel(self.target, options=channel_options() if self.s.retry_policy else [("grpc.enable_retries", 0)])
        # retries=0: what is retried is retried by gRPC's service config, nothing else
        async with AsyncRecsysClient(self.target, channel=channel, retries=0, timeout_s=self.s.call_timeout_s) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.s.concurrency)))
        await channel.close()

    def start(self) -> MixedLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def phase_qps(outcomes: list[Outcome], windows: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Calls completed per second inside each phase's window."""
    out = {}
    for phase, (start, end) in windows.items():
        done = sum(1 for o in outcomes if start <= o[1] < end)
        out[phase] = round(done / (end - start), 1) if end > start else 0.0
    return out


# ---------------------------------------------------------------------------- consistency


def check_history(
    redis_url: str, acked: list[tuple[int, int, int]], targets: list[str], movies: list[int], first_user: int, n_users: int, seed: int
) -> dict[str, Any]:
    """Acknowledged writes all in Redis; a write through one orchestrator seen through the other.

    Returns:
        ``{"acked", "lost", "cross_checked", "cross_failures": [...]}``.
    """
    from clients.client import RecsysClient
    from orchestrator.store import RedisHistoryStore

    store = RedisHistoryStore(redis_url)
    try:
        stored: dict[int, set[tuple[int, int]]] = {}
        for user in {u for u, _, _ in acked}:
            h = store.history(user)
            stored[user] = set(zip(h.movie_ids.tolist(), h.timestamps.tolist()))
    finally:
        store.close()
    lost = sum(1 for u, m, t in set(acked) if (m, t) not in stored.get(u, set()))
    rng = random.Random(seed + 1)
    failures: list[str] = []
    clients = [RecsysClient(t, timeout_s=10.0) for t in targets]
    try:
        for i in range(n_users):
            user = first_user + i
            a, b = (0, 1) if i % 2 == 0 else (1, 0)  # both directions
            first, second = rng.sample(movies, 2)
            ts = int(time.time()) - 1000
            r1 = clients[a].record_interaction(user, first, 5.0, ts)
            r2 = clients[b].record_interaction(user, second, 5.0, ts + 1)
            if r1.history_length != 1 or r2.history_length != 2:
                failures.append(f"user {user}: lengths {r1.history_length} via {a}, {r2.history_length} via {b} (want 1, 2)")
            # the other replica's Recommend reads the history written through the first (seen movies excluded)
            rec = clients[b].recommend(user, k=50)
            if rec.is_fallback or first in {it.movie_id for it in rec.items}:
                failures.append(
                    f"user {user}: Recommend via {b} fallback={rec.is_fallback}, seen movie {first} returned={first in {it.movie_id for it in rec.items}}"
                )
    finally:
        for c in clients:
            c.close()
    return {"acked": len(set(acked)), "lost": lost, "cross_checked": n_users, "cross_failures": failures}


# ---------------------------------------------------------------------------- the run


def run_benchmark(
    s: ScaleoutSettings, artifacts: str | None = None, repo: str | None = None, data: str = DEFAULT_DATA_DIR, keep: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the scale-out; returns ``(report, details)`` (details: conditions, errors, counts)."""
    import pandas as pd

    from benchmarks.faults.run import prepare_deployment
    from benchmarks.faults.stack import Stack

    workdir = Path(tempfile.mkdtemp(prefix="recsys-scaleout-"))
    redis_proc = haproxy = None
    stacks: list[Stack] = []
    details: dict[str, Any] = {"workdir": str(workdir)}
    try:
        for binary in ("redis-server", "haproxy"):
            require(binary)  # fail before any training or start-up
        art, rep, deployment = prepare_deployment(artifacts, repo, data, workdir, in_place=artifacts is not None)
        details["deployment"] = deployment
        redis_proc, redis_url = start_redis(workdir)
        env = {"RECSYS_HISTORY_STORE": "redis", "RECSYS_REDIS_URL": redis_url, "RECSYS_RELOAD_POLL_S": "0"}
        for i in range(REPLICAS):
            replica_dir = workdir / f"replica{i}"
            replica_dir.mkdir()
            stacks.append(Stack(art, rep, replica_dir, env))
        for i, st in enumerate(stacks):
            log(f"replica {i}: Triton up in {st.start_triton():.1f} s")
        for i, st in enumerate(stacks):  # one at a time: the first seeds Redis, the second finds it seeded
            log(f"replica {i}: orchestrator SERVING in {st.start_orchestrator():.1f} s")
        haproxy, port = start_haproxy(workdir, [st.target for st in stacks])
        balancer = {
            "name": "haproxy",
            "version": haproxy_version(),
            "address": f"127.0.0.1:{port}",
            "how": "mode http, HTTP/2 cleartext both sides, roundrobin per call, TCP checks every 500 ms, redispatch on refused connections",
        }
        log(f"haproxy {balancer['version']} on {balancer['address']} -> {', '.join(st.target for st in stacks)}")

        inter = pd.read_parquet(art / "interactions.parquet", columns=["user_id"]).user_id
        users = sorted(int(u) for u in inter.unique())
        movies = [int(m) for m in pd.read_parquet(art / "items.parquet", columns=["movie_id"]).movie_id]
        fresh = max(users) + 1_000
        watch = LoadWatch().__enter__()  # the machine's load over the measured part
        load = MixedLoad(f"127.0.0.1:{port}", users, movies, fresh, s).start()
        windows: dict[str, tuple[float, float]] = {}
        killed: list[dict[str, Any]] = []
        t_run = time.monotonic()

        t0 = time.monotonic()
        time.sleep(s.phase_s)
        windows["steady"] = (t0, time.monotonic())
        log(f"steady: {len(load.outcomes):,} calls")

        t0 = time.monotonic()
        stacks[0].kill_orchestrator()
        log("orchestrator 0 SIGKILLed")
        time.sleep(s.down_s)
        restart = stacks[0].start_orchestrator()
        windows["orchestrator_killed"] = (t0, time.monotonic())
        killed.append(
            {
                "process": "orchestrator",
                "replica": 0,
                "signal": "SIGKILL",
                "at_s": round(t0 - t_run, 2),
                "down_s": s.down_s,
                "restart_to_serving_s": round(restart, 2),
            }
        )
        log(f"orchestrator 0 SERVING again after {restart:.1f} s")

        t0 = time.monotonic()
        stubs = stacks[1].kill_triton()
        log("Triton 1 SIGKILLed")
        time.sleep(s.down_s)
        orphans = stacks[1].reap_orphans(stubs)
        restart = stacks[1].start_triton()
        windows["triton_killed"] = (t0, time.monotonic())
        killed.append(
            {
                "process": "triton",
                "replica": 1,
                "signal": "SIGKILL",
                "at_s": round(t0 - t_run, 2),
                "down_s": s.down_s,
                "restart_to_ready_s": round(restart, 2),
            }
        )
        details["orphan_stubs_reaped"] = orphans
        log(f"Triton 1 READY again after {restart:.1f} s")

        t0 = time.monotonic()
        time.sleep(s.phase_s)
        windows["recovered"] = (t0, time.monotonic())
        load.stop()
        watch.__exit__()

        outcomes = load.outcomes
        failed = [o for o in outcomes if o[3] != "OK"]
        consistency = check_history(
            redis_url, load.acked, [st.target for st in stacks], movies, fresh + 10_000, s.consistency_users, s.seed
        )
        report = {
            "orchestrators": REPLICAS,
            "tritons": REPLICAS,
            "balancer": balancer,
            "requests": len(outcomes),
            "failed": len(failed),
            "killed": killed,
            "history_consistent": consistency["lost"] == 0 and not consistency["cross_failures"] and consistency["acked"] > 0,
            "qps": phase_qps(outcomes, windows),
        }
        details.update(
            by_rpc=dict(Counter(o[2] for o in outcomes)),
            recommend_fallbacks=load.fallbacks,
            failed_by_status=dict(Counter(f"{o[2]} {o[3]}" for o in failed)),
            errors=load.errors,
            consistency=consistency,
            conditions={**conditions(), "load_average": watch.record()},
            settings=s.__dict__,
        )
        return report, details
    finally:
        for st in stacks:
            with contextlib.suppress(Exception):
                st.close()
        stop(haproxy)
        stop(redis_proc)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``recsys bench scaleout`` (``python -m benchmarks.scaleout`` takes the same)."""
    p.add_argument("--artifacts", default=None, help="artifacts folder (served in place); default: train a tiny model on --data")
    p.add_argument("--repo", default=None, help="model repository (served in place); give it with --artifacts")
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="data for the tiny model (default: %(default)s)")
    p.add_argument("--out", default=str(REPORTS / "scaleout.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight through the balancer (default: %(default)s)")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds of the steady and recovered phases (default: %(default)s)")
    p.add_argument("--down-s", type=float, default=3.0, help="seconds a killed process stays down (default: %(default)s)")
    p.add_argument("--write-share", type=float, default=0.2, help="share of RecordInteraction calls (default: %(default)s)")
    p.add_argument("--no-retry-policy", action="store_true", help="control run: the client channel without the retry service config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, haproxy.cfg, Redis files)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``recsys bench scaleout``: runs, writes the JSON, prints it with the conditions; 0 only if no call failed."""
    import json

    s = ScaleoutSettings(
        concurrency=args.concurrency,
        phase_s=args.phase_s,
        down_s=args.down_s,
        write_share=args.write_share,
        retry_policy=not args.no_retry_policy,
        seed=args.seed,
    )
    try:
        report, details = run_benchmark(s, args.artifacts, args.repo, args.data, keep=args.keep)
    except RuntimeError as exc:
        print(f"recsys bench scaleout: {exc}", file=sys.stderr)
        return 2
    out = write_json(args.out, report)
    log("details: " + json.dumps({k: v for k, v in details.items() if k != "conditions"}, default=str))
    print(json.dumps(report, indent=2))
    print(conditions_line(details["conditions"]))
    print(f"wrote {out}")
    return 0 if report["failed"] == 0 and report["history_consistent"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
