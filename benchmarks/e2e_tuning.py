"""What each serving knob buys: the e2e benchmark on copies of one deployment, one knob changed each.

    python -m benchmarks.e2e_tuning --artifacts A --repo R [--requests 500] [--rounds 2]

Each variant is a copy of the model repository with its CPU configs edited (dynamic-batching
delay, instance count, onnxruntime threads) and/or a change to the orchestrator's settings
(``RECSYS_*`` environment, e.g. gRPC workers, warm-up calls). Variants run in turns, ``--rounds``
times, so a burst of load from another process on this shared machine hits every variant
alike; the table reports the median over the rounds of each figure next to the baseline's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPORTS, conditions, log, markdown_table, write_json
from benchmarks.e2e import run_served

RANKER_MODELS = ("ranker_features", "ranker")


@dataclass(frozen=True)
class Variant:
    """One change against the baseline.

    Attributes:
        name: Label in the table.
        edits: ``{model: [(regex, replacement), ...]}`` applied to ``configs/cpu.pbtxt``.
        env: Orchestrator environment (``RECSYS_*`` settings).
        fuse_ranker: Serve ``ranker_ensemble`` on the CPU as one Python-backend model running
            both graphs (``onnx_chain``) instead of an ensemble of two Python-backend models.
    """

    name: str
    edits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    fuse_ranker: bool = False


def _delay(us: int) -> tuple[str, str]:
    return (r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {us}")


def _count(n: int) -> tuple[str, str]:
    return (r"count: \d+", f"count: {n}")


def _threads(n: int) -> tuple[str, str]:
    return (r'(key: "intra_op_threads", value: \{ string_value: )"\d+"', rf'\g<1>"{n}"')


VARIANTS = (
    Variant("baseline"),
    Variant("no warm-up", env={"RECSYS_WARMUP_CALLS": "0"}),
    Variant("batch delay 0 us (all)", edits={m: [_delay(0)] for m in ("user_tower", *RANKER_MODELS)}),
    Variant("ranker 2 instances", edits={m: [_count(2)] for m in RANKER_MODELS}),
    Variant("ranker 2 ORT threads", edits={m: [_threads(2)] for m in RANKER_MODELS}),
    Variant("ranker fused (one Python model)", fuse_ranker=True),
    Variant("gRPC workers 16", env={"RECSYS_WORKERS": "16"}),
    Variant("gRPC workers 4", env={"RECSYS_WORKERS": "4"}),
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
    if variant.fuse_ranker:
        fuse_ranker(out)
    return out


def fuse_ranker(repo: Path) -> None:
    """Rewrites ``ranker_ensemble``'s CPU config as a Python-backend model chaining the two graphs."""
    model = repo / "ranker_ensemble"
    cfg = model / "configs" / "cpu.pbtxt"
    text = cfg.read_text()
    head, _, _ = text.partition("ensemble_scheduling")
    leaf = (repo / "ranker" / "configs" / "cpu.pbtxt").read_text()
    tail = leaf[leaf.index("instance_group") :].replace(
        "parameters {", 'parameters { key: "onnx_chain", value: { string_value: "ranker_features,ranker" } }\nparameters {', 1
    )
    if "max_batch_size: 0" in head:  # the unbatched ensemble's layout: no dynamic batching to copy
        tail = re.sub(r"dynamic_batching \{.*?\n\}\n", "", tail, flags=re.S)
    cfg.unlink()
    cfg.write_text(head.replace('platform: "ensemble"', 'backend: "python"') + tail)
    shim = repo / "ranker" / "model.py"
    for version in (p for p in model.iterdir() if p.name.isdigit()):
        shutil.copyfile(shim, version / "model.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", action="append", help="variant names to run (default: all)")
    p.add_argument("--out", default=str(REPORTS / "e2e_tuning.json"))
    args = p.parse_args(argv)
    from benchmarks.e2e import known_users

    artifacts, repo = Path(args.artifacts), Path(args.repo)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    users = known_users(artifacts, 1 + args.warmup + args.requests, 0)
    variants = [v for v in VARIANTS if not args.only or v.name in args.only or v.name == "baseline"]
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="e2e-tuning-", dir=repo.parent) as tmp:
        repos = {v.name: variant_repo(repo, v, Path(tmp)) for v in variants}
        for r in range(args.rounds):
            for v in variants:
                log(f"round {r + 1}/{args.rounds}: {v.name}")
                saved = {k: os.environ.get(k) for k in v.env}
                os.environ.update(v.env)
                try:
                    runs[v.name].append(
                        run_served(artifacts, repos[v.name], users, levels, args.requests, args.warmup, 10, 5.0, (), extras=False)
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
        s["stages_ms"] = runs[v.name][-1].get("stages_ms", {})
        summary[v.name] = s
        rows.append([v.name, s["first_call_ms"], *(s[f"c{c}_{q}"] for c in levels for q in ("p50_ms", "p99_ms", "qps"))])
    headers = ["variant", "first call ms", *(f"c{c} {q}" for c in levels for q in ("p50 ms", "p99 ms", "QPS"))]
    print(markdown_table(headers, rows))
    cond = conditions(requests=args.requests, warmup=args.warmup, rounds=args.rounds, artifacts=str(artifacts))
    write_json(args.out, {"conditions": cond, "variants": summary, "runs": runs})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
