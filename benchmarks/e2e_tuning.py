"""What each serving knob buys: the e2e benchmark on copies of one deployment, one knob changed each.

    python -m benchmarks.e2e_tuning --artifacts A --repo R [--requests 500] [--rounds 2]

Each variant is a copy of the model repository with its CPU configs edited (dynamic-batching
delay, instance count, onnxruntime threads, the ranker as a Triton ensemble again) and/or a
change to the orchestrator's settings (``RECSYS_*`` environment, e.g. gRPC workers, warm-up
calls). ``--overload`` adds the c64 overload run (admitted and shed p99) to every variant. Variants run in turns, ``--rounds``
times, so a burst of load from another process on this shared machine hits every variant
alike; the table reports the median over the rounds of each figure next to the baseline's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPORTS, conditions, log, markdown_table, write_json
from benchmarks.e2e import run_served

RANKER = "ranker_ensemble"
"""The CPU config's ranker: one Python-backend model running both graphs (``export/triton_config.py``)."""


@dataclass(frozen=True)
class Variant:
    """One change against the baseline.

    Attributes:
        name: Label in the table.
        edits: ``{model: [(regex, replacement), ...]}`` applied to ``configs/cpu.pbtxt``.
        env: Orchestrator environment (``RECSYS_*`` settings).
        ensemble_ranker: Serve ``ranker_ensemble`` on the CPU as the Triton ensemble of two
            Python-backend models (the native configs' layout, the CPU default before) instead
            of the fused model.
        source: A git revision of this project whose orchestrator serves instead (``git
            archive`` into a temporary folder; the models and configs are still the variant's).
    """

    name: str
    edits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ensemble_ranker: bool = False
    source: str = ""


def _delay(us: int) -> tuple[str, str]:
    return (r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {us}")


def _count(n: int) -> tuple[str, str]:
    return (r"count: \d+", f"count: {n}")


def _threads(n: int) -> tuple[str, str]:
    return (r'(key: "intra_op_threads", value: \{ string_value: )"\d+"', rf'\g<1>"{n}"')


def _preferred(sizes: str) -> tuple[str, str]:
    return (r"preferred_batch_size: \[ [\d, ]+ \]", f"preferred_batch_size: [ {sizes} ]")


VARIANTS = (
    Variant("baseline"),
    Variant("ranker as Triton ensemble (2 Python models)", ensemble_ranker=True),
    Variant("no warm-up", env={"RECSYS_WARMUP_CALLS": "0"}),
    Variant("user tower delay 0 us", edits={"user_tower": [_delay(0)]}),
    Variant("user tower delay 1000 us, sizes 2,4,8,16", edits={"user_tower": [_delay(1000), _preferred("2, 4, 8, 16")]}),
    Variant("ranker 1 instance", edits={RANKER: [_count(1)]}),
    Variant("user tower 2 instances", edits={"user_tower": [_count(2)]}),
    Variant("ranker 2 ORT threads", edits={RANKER: [_threads(2)]}),
    Variant("gRPC workers 32", env={"RECSYS_WORKERS": "32"}),
    Variant("gRPC workers 24", env={"RECSYS_WORKERS": "24"}),
    Variant("max_in_flight 8", env={"RECSYS_MAX_IN_FLIGHT": "8"}),
    Variant("GIL switch 1 ms", env={"RECSYS_GIL_SWITCH_MS": "1"}),
    Variant("GIL switch 0.25 ms", env={"RECSYS_GIL_SWITCH_MS": "0.25"}),
    Variant("max_running 16 (every admitted call runs at once)", env={"RECSYS_MAX_RUNNING": "16"}),
    Variant("max_running 2", env={"RECSYS_MAX_RUNNING": "2"}),
    Variant("max_running 4", env={"RECSYS_MAX_RUNNING": "4"}),
    Variant("user-tower overlap off", env={"RECSYS_OVERLAP_USER_TOWER": "false"}),
)


def variant_repo(repo: Path, variant: Variant, into: Path) -> Path:
    """A copy of ``repo`` with ``variant``'s config edits (the ONNX files are hard-linked, not copied)."""
    out = into / re.sub(r"\W+", "_", variant.name)
    shutil.copytree(repo, out, copy_function=os.link)
    for model, edits in variant.edits.items():
        cfg = out / model / "configs" / "cpu.pbtxt"
        text = cfg.read_text()
        for pattern, repl in edits:
            text, n = re.subn(pattern, repl, text)
            if n == 0:
                raise ValueError(f"{cfg}: {pattern!r} not found")
        cfg.unlink()  # a hard link: do not edit the original through it
        cfg.write_text(text)
    if variant.ensemble_ranker:
        ensemble_ranker(out)
    return out


def checkout(revision: str, into: Path) -> Path:
    """The project's tree at ``revision`` (``git archive``), to serve from."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def ensemble_ranker(repo: Path) -> None:
    """Makes ``ranker_ensemble``'s CPU config the Triton ensemble (its native config's text)."""
    cfg = repo / RANKER / "configs" / "cpu.pbtxt"
    cfg.unlink()  # a hard link: do not edit the original through it
    shutil.copyfile(repo / RANKER / "config.pbtxt", cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", action="append", help="variant names to run (default: all)")
    p.add_argument("--source", action="append", default=[], help="also serve from this git revision (a variant named 'served from REV')")
    p.add_argument("--overload", action="store_true", help="also the c64 overload run (admitted / shed p99) per variant")
    p.add_argument("--out", default=str(REPORTS / "e2e_tuning.json"))
    args = p.parse_args(argv)
    from benchmarks.e2e import known_users

    artifacts, repo = Path(args.artifacts), Path(args.repo)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    users = known_users(artifacts, 1 + args.warmup + args.requests, 0)
    extra = tuple(Variant(f"served from {rev}", source=rev) for rev in args.source)
    variants = [v for v in (*VARIANTS, *extra) if not args.only or v.name in args.only or v.name == "baseline" or v.source]
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="e2e-tuning-", dir=repo.parent) as tmp:
        repos = {v.name: variant_repo(repo, v, Path(tmp)) for v in variants}
        sources = {v.name: checkout(v.source, Path(tmp) / f"src-{v.source}") for v in variants if v.source}
        for r in range(args.rounds):
            for v in variants:
                log(f"round {r + 1}/{args.rounds}: {v.name}")
                saved = {k: os.environ.get(k) for k in v.env}
                os.environ.update(v.env)
                try:
                    runs[v.name].append(
                        run_served(
                            artifacts,
                            repos[v.name],
                            users,
                            levels,
                            args.requests,
                            args.warmup,
                            10,
                            5.0,
                            (),
                            extras=False,
                            overload=args.overload,
                            cwd=sources.get(v.name),
                        )
                    )
                finally:
                    for k, old in saved.items():
                        os.environ.pop(k) if old is None else os.environ.__setitem__(k, old)
    rows, summary = [], {}
    for v in variants:
        med = lambda f: round(statistics.median(f(x) for x in runs[v.name]), 2)  # noqa: E731
        s = {"first_call_ms": med(lambda x: x["first_call_ms"])}
        for c in levels:
            for q in ("p50_ms", "p99_ms", "qps"):
                s[f"c{c}_{q}"] = med(lambda x: x["levels"][f"c{c}"][q])
        # the machine's drift between rounds shows here first: the same variant's CPU per call
        top = f"c{levels[-1]}"
        s[f"{top}_cpu_ms"] = med(lambda x: (x["levels"][top].get("cpu") or {}).get("total_ms") or 0.0)
        over = ("admitted_p99_ms", "shed_p99_ms") if args.overload else ()
        for q in over:
            s[f"c64_{q}"] = med(lambda x: x["overload"][q] or 0.0)
        s["stages_ms"] = runs[v.name][-1].get("stages_ms", {})
        summary[v.name] = s
        rows.append(
            [
                v.name,
                s["first_call_ms"],
                *(s[f"c{c}_{q}"] for c in levels for q in ("p50_ms", "p99_ms", "qps")),
                s[f"{top}_cpu_ms"],
                *(s[f"c64_{q}"] for q in over),
            ]
        )
    headers = [
        "variant",
        "first call ms",
        *(f"c{c} {q}" for c in levels for q in ("p50 ms", "p99 ms", "QPS")),
        f"c{levels[-1]} CPU ms/call",
    ]
    headers += ["c64 admitted p99 ms", "c64 shed p99 ms"] if args.overload else []
    print(markdown_table(headers, rows))
    cond = conditions(requests=args.requests, warmup=args.warmup, rounds=args.rounds, artifacts=str(artifacts))
    write_json(args.out, {"conditions": cond, "variants": summary, "runs": runs})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
