"""Faults benchmark, the run: prepare a deployment, run the phases, judge the targets, the CLI.

See :mod:`benchmarks.faults` for what is measured and why.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, write_json
from benchmarks.faults.drift_soak import METRICS_PORT_ENV, phase_drift, phase_soak
from benchmarks.faults.fuzz import phase_fuzz
from benchmarks.faults.load import Workload, phase_deadline, phase_durability, phase_load, phase_reload, phase_triton_killed
from benchmarks.faults.stack import PHASES, SECTION_KEYS, FaultSettings, Stack
from export import DEFAULT_DATA_DIR

# ---------------------------------------------------------------------------- the run


def prepare_deployment(
    artifacts: str | None, repo: str | None, data: str, workdir: Path, in_place: bool
) -> tuple[Path, Path, dict[str, Any]]:
    """The artifacts and repository to serve: copies of the given ones, or a tiny model trained on ``data``."""
    if (artifacts is None) != (repo is None):
        raise ValueError("give both --artifacts and --repo, or neither (then a tiny model is trained on --data)")
    if artifacts is not None and repo is not None:
        if in_place:
            return Path(artifacts), Path(repo), {"source": "given, served in place", "artifacts": artifacts, "repo": repo}
        art, rep = workdir / "artifacts", workdir / "model_repository"
        shutil.copytree(artifacts, art)
        shutil.copytree(repo, rep, ignore=shutil.ignore_patterns("__pycache__"))
        return (
            art,
            rep,
            {"source": "copies of the given folders", "artifacts": str(Path(artifacts).resolve()), "repo": str(Path(repo).resolve())},
        )
    import torch

    from export.onnx_export import export_repository
    from export.pipeline import TrainSettings, train
    from export.ranker import RankerConfig
    from export.two_tower import TwoTowerConfig

    log(f"no --artifacts/--repo: training a tiny model on {data}")
    tiny = TrainSettings(
        two_tower=TwoTowerConfig(dim=16, hidden=32, history_len=10, epochs=2, batch_size=256, patience=2, lr=5e-3),
        ranker=RankerConfig(candidates=30, n_estimators=20, min_child_samples=5),
        refit=False,
    )
    art, rep = workdir / "artifacts", workdir / "model_repository"
    torch.set_num_threads(1)
    train(data, art, tiny, progress=False)
    export_repository(art, rep)
    return art, rep, {"source": f"tiny model trained on {data} for this run", "artifacts": str(art), "repo": str(rep)}


def skipped_section(phase: str) -> dict[str, Any]:
    """The section of a phase that did not run: its keys, null."""
    return {**{k: None for k in SECTION_KEYS[phase]}, "skipped": True}


def run_benchmark(
    s: FaultSettings,
    artifacts: str | None = None,
    repo: str | None = None,
    data: str = DEFAULT_DATA_DIR,
    keep: bool = False,
    in_place: bool = False,
) -> dict[str, Any]:
    """Every phase not skipped, in order, on one stack; the report (see the module docstring)."""
    import pandas as pd

    from orchestrator.settings import ServeSettings

    workdir = Path(tempfile.mkdtemp(prefix="recsys-faults-"))
    report: dict[str, Any] = {}
    stack = None
    try:
        art, rep, source = prepare_deployment(artifacts, repo, data, workdir, in_place)
        workload = Workload.from_artifacts(art, s.history_share, s.k)
        n_interactions = len(pd.read_parquet(art / "interactions.parquet", columns=["user_id"]))
        from orchestrator.tritonserver import free_port

        env = {
            "RECSYS_RELOAD_POLL_S": str(s.reload_poll_s),
            METRICS_PORT_ENV: str(free_port()),  # the drift phase reads recsys_drift_psi there
            "RECSYS_DRIFT_WINDOW_REQUESTS": str(s.drift_window),
            "RECSYS_DRIFT_MIN_REQUESTS": str(min(200, s.drift_window)),
        }
        if s.health_poll_s is not None:
            env["RECSYS_HEALTH_POLL_S"] = str(s.health_poll_s)
        stack = Stack(art, rep, workdir, env)
        # what the orchestrator subprocess will read: its defaults, then these variables
        served = asdict(ServeSettings.from_env({**os.environ, **env}))
        with LoadWatch() as load:
            triton_s = stack.start_triton()
            orch_s = stack.start_orchestrator()
            log(f"Triton ready in {triton_s:.1f} s, orchestrator SERVING in {orch_s:.1f} s at {stack.target}")
            phases = {
                "load": phase_load,
                "drift": phase_drift,
                "triton_killed": phase_triton_killed,
                "deadline": phase_deadline,
                "reload": phase_reload,
                "durability": phase_durability,
                "fuzz": phase_fuzz,
                "soak": phase_soak,
            }
            for name, fn in phases.items():
                if name in s.skip:
                    report[name] = skipped_section(name)
                    continue
                log(f"phase {name}")
                with LoadWatch() as watch:
                    report[name] = fn(stack, workload, s)
                report[name]["load_average"] = watch.record()
                report[name]["fallback_counts_as"] = FALLBACK_COUNTS_AS[name]
                log(f"phase {name} done in {watch.seconds:.1f} s")
        report = {
            "conditions": conditions(
                deployment=source,
                catalog={
                    "items": len(workload.movies),
                    "users": len(workload.users),
                    "interactions": n_interactions,
                    "genres": len(workload.genres),
                },
                settings=asdict(s),
                orchestrator={
                    **{
                        k: served.get(k)
                        for k in ("workers", "triton_timeout_s", "default_deadline_s", "health_poll_s", "retrieve_k", "reload_poll_s")
                    },
                    "env": env,
                    "flags": list(stack.serve_flags),
                },
                triton={"startup_s": round(triton_s, 2), "config": "embedded, CPU configs (configs/cpu.pbtxt)"},
                orchestrator_startup_s=round(orch_s, 2),
                load_average=load.record(),
                workdir=str(workdir) if keep else None,
            ),
            **report,
        }
    finally:
        if stack is not None:
            stack.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for t in evaluate_targets(report):  # inside each section: the report's top level is fixed
        report[t.pop("phase")].setdefault("targets", []).append(t)
    return report


MODEL_UNAVAILABLE = "FALLBACK_REASON_MODEL_UNAVAILABLE"
"""The fallback of a call whose model (version) the backend does not serve."""

FALLBACK_COUNTS_AS = {
    "load": "answered: a popular-fallback answer is OK, not an error; `errors` counts non-OK statuses only, "
    "so 0 errors does not mean 0 fallbacks (see `fallback`)",
    "triton_killed": "answered: with Triton down the popular fallback is the answer, and the target is that every call gets one",
    "deadline": "not counted: every call must end DEADLINE_EXCEEDED",
    "reload": "answered, not failed; but a MODEL_UNAVAILABLE fallback (a version the backend does not serve) misses the "
    "target `model_unavailable fallbacks` = 0, and only personal answers count for `new version served`",
    "durability": "a fallback with history_length >= 1 counts as visible (the write is seen, whatever the answer)",
    "fuzz": "an OK answer, fallback or not, is an acceptable status",
    "drift": "not in the distributions: fallbacks carry no drift sample, so PSI describes model answers only (`fallback` counts them)",
    "soak": "answered: `errors` counts non-OK statuses only, a popular-fallback answer is not an error (`fallback` counts them)",
}
"""Per phase: whether a popular-fallback answer counts as answered (in each section as ``fallback_counts_as``)."""


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value; ``met`` is None for a skipped phase."""

    def t(phase: str, name: str, value: Any, target: str, ok: Callable[[], bool]) -> dict[str, Any]:
        skipped = report.get(phase, {}).get("skipped")
        return {"phase": phase, "target": name, "value": value, "wanted": target, "met": None if skipped else bool(ok())}

    ld, tk, dl, rl, du, fz = (report.get(p, {}) for p in ("load", "triton_killed", "deadline", "reload", "durability", "fuzz"))
    dr, sk = report.get("drift", {}), report.get("soak", {})
    return [
        t("load", "errors", ld.get("errors"), "0", lambda: ld["errors"] == 0),
        t(
            "triton_killed",
            "unanswered",
            None if tk.get("skipped") else tk["requests"] - tk["answered"],
            "0",
            lambda: tk["answered"] == tk["requests"],
        ),
        t("triton_killed", "health NOT_SERVING while down", tk.get("health_not_serving"), "yes", lambda: tk["health_not_serving"]),
        t(
            "triton_killed",
            "recovered_after_ready_s",
            tk.get("recovered_after_ready_s"),
            "<= 5",
            lambda: tk["recovered_after_ready_s"] is not None and tk["recovered_after_ready_s"] <= 5.0,
        ),
        t(
            "deadline",
            "calls not DEADLINE_EXCEEDED",
            None if dl.get("skipped") else dl["calls"] - dl["deadline_exceeded"],
            "0",
            lambda: dl["deadline_exceeded"] == dl["calls"],
        ),
        t("deadline", "leaked_threads", dl.get("leaked_threads"), "<= 0", lambda: dl["leaked_threads"] <= 0),
        t("deadline", "leaked_fds", dl.get("leaked_fds"), "<= 0", lambda: dl["leaked_fds"] <= 0),
        t("reload", "failed", rl.get("failed"), "0", lambda: rl["failed"] == 0),
        t("reload", "new version served", rl.get("reloaded"), "yes", lambda: rl["reloaded"]),
        t(
            "reload",
            "model_unavailable fallbacks",
            None if rl.get("skipped") else rl["fallback_by_reason"].get(MODEL_UNAVAILABLE, 0),
            "0",
            lambda: rl["fallback_by_reason"].get(MODEL_UNAVAILABLE, 0) == 0,
        ),
        t(
            "reload",
            "old version answers after the first new one",
            rl.get("old_version_after_new"),
            "0",
            lambda: rl["old_version_after_new"] == 0,
        ),
        t("durability", "lost", du.get("lost"), "0", lambda: du["lost"] == 0 and du["acked"] > 0),
        t("fuzz", "internal", fz.get("internal"), "0", lambda: fz["internal"] == 0),
        t("fuzz", "crashes", fz.get("crashes"), "0", lambda: fz["crashes"] == 0),
        t(
            "fuzz",
            "other statuses / empty messages",
            None if fz.get("skipped") else fz["other_status"] + fz["empty_messages"],
            "0",
            lambda: fz["other_status"] == 0 and fz["empty_messages"] == 0,
        ),
        t(
            "drift",
            "max PSI, ordinary traffic",
            dr.get("psi_normal"),
            "< 0.1",
            lambda: dr["psi_normal"] is not None and dr["psi_normal"] < 0.1,
        ),
        t(
            "drift",
            "max PSI, one-genre histories",
            dr.get("psi_shifted"),
            "> 0.25",
            lambda: dr["psi_shifted"] is not None and dr["psi_shifted"] > 0.25,
        ),
        t("drift", "alert condition (recsys_drift_psi > 0.25)", dr.get("alert"), "true", lambda: dr["alert"] is True),
        t("soak", "errors", sk.get("errors"), "0", lambda: sk["errors"] == 0 and sk["requests"] > 0),
        t(
            "soak",
            "rss_growth_pct after warm-up",
            sk.get("rss_growth_pct"),
            "<= 5",
            lambda: sk["rss_growth_pct"] is not None and sk["rss_growth_pct"] <= 5.0,
        ),
        t("soak", "fds_delta", sk.get("fds_delta"), "<= 0", lambda: sk["fds_delta"] is not None and sk["fds_delta"] <= 0),
        t("soak", "threads_delta", sk.get("threads_delta"), "<= 0", lambda: sk["threads_delta"] is not None and sk["threads_delta"] <= 0),
    ]


def table(report: dict[str, Any]) -> str:
    """The figures of every phase, one row each."""

    def ms(section: dict) -> str:
        lat = section.get("latency") or {}
        return f"p50 {lat.get('p50_ms', math.nan):.1f} / p99 {lat.get('p99_ms', math.nan):.1f} ms" if lat.get("n") else "-"

    rows = []
    ld = report["load"]
    if not ld.get("skipped"):
        rows.append(
            (
                "load",
                f"{ld['requests']:,} Recommend at c{ld['concurrency']}: {ld['errors']} errors {ld['errors_by_status']}, "
                f"{ld['qps']} QPS, {ms(ld)}",
            )
        )
    tk = report["triton_killed"]
    if not tk.get("skipped"):
        rows.append(
            (
                "triton_killed",
                f"{tk['requests']:,} calls at c{tk['concurrency']}: {tk['answered']:,} answered, {tk['fallback']:,} fallback; "
                f"NOT_SERVING {tk['health_not_serving_after_kill_s']} s after the kill; Triton restart {tk['triton_restart_s']} s; "
                f"first personal answer {tk['recovered_s']} s after the restart began, {tk['recovered_after_ready_s']} s after ready; "
                f"orphaned backend stubs {tk['orphaned_backend_stub_models'] or 0}",
            )
        )
    dl = report["deadline"]
    if not dl.get("skipped"):
        rows.append(
            (
                "deadline",
                f"{dl['calls']:,} calls, {dl['deadline_s'] * 1e3:.0f} ms deadline, Triton stopped: {dl['by_status']}; "
                f"threads {dl['threads']['before']} -> peak {dl['threads']['peak']} -> {dl['threads']['after']}, "
                f"fds {dl['fds']['before']} -> peak {dl['fds']['peak']} -> {dl['fds']['after']} ({dl['settle_s']} s after SIGCONT)",
            )
        )
    rl = report["reload"]
    if not rl.get("skipped"):
        rows.append(
            (
                "reload",
                f"{rl['requests']:,} calls at c{rl['concurrency']} during `recsys export` ({rl['export_s']} s, rc {rl['export_rc']}): "
                f"{rl['failed']} failed, {rl['fallback']} fallback, versions {rl['versions']}, reloaded {rl['reloaded']}"
                + (f", new version first {rl['first_new_version_after_export_s']} s after the export" if rl["reloaded"] else ""),
            )
        )
    du = report["durability"]
    if not du.get("skipped"):
        rows.append(
            (
                "durability",
                f"{du['acked']:,} acknowledged, SIGKILL, restart {du['restart_s']} s: {du['found']:,} found, {du['lost']} lost; "
                f"visible via Recommend {du['visible_via_recommend']['with_history']}/{du['visible_via_recommend']['checked']}",
            )
        )
    fz = report["fuzz"]
    if not fz.get("skipped"):
        und = fz.get("undecodable") or {}
        rows.append(
            (
                "fuzz",
                f"{fz['requests']:,} hostile requests ({fz['seconds']} s): {fz['internal']} INTERNAL/UNKNOWN, {fz['crashes']} crashes, "
                f"{fz['other_status']} other statuses, {fz['empty_messages']} empty messages; statuses {fz['by_status']}; "
                f"undecodable bytes: {und.get('by_status')}",
            )
        )
    dr = report.get("drift", {})
    if dr and not dr.get("skipped"):
        rows.append(
            (
                "drift",
                f"max PSI {dr['psi_normal']} on {dr['requests_per_part']:,} ordinary calls, {dr['psi_shifted']} on as many "
                f"one-genre ones ({dr['shift']}); alert {dr['alert']}; window {dr['window_requests']} answers",
            )
        )
    sk = report.get("soak", {})
    if sk and not sk.get("skipped"):
        rows.append(
            (
                "soak",
                f"{sk['minutes']} min at c{sk['concurrency']}: {sk['requests']:,} calls, {sk['errors']} errors, {sk['fallback']} fallback; "
                f"RSS {sk['rss_growth_pct']} % after {sk['warmup_s']} s warm-up (Triton {sk['triton_rss_growth_pct']} %), "
                f"fds {sk['fds_delta']:+d}, threads {sk['threads_delta']:+d}; {ms(sk)}",
            )
        )
    return markdown_table(("phase", "figures"), rows)


def all_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every section's targets, each with its phase."""
    return [{"phase": p, **t} for p in PHASES for t in report[p].get("targets", [])]


def targets_text(report: dict[str, Any]) -> str:
    lines = []
    for t in all_targets(report):
        mark = "skipped" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        lines.append(f"  {mark:<8} {t['phase']}: {t['target']} = {t['value']} (wanted {t['wanted']})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``recsys bench faults`` (``python -m benchmarks.faults`` takes the same)."""
    p.add_argument("--artifacts", default=None, help="artifacts folder (copied); default: train a tiny model on --data")
    p.add_argument("--repo", default=None, help="model repository (copied); give it with --artifacts")
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="data for the tiny model (default: %(default)s)")
    p.add_argument("--in-place", action="store_true", help="serve --artifacts/--repo without copying (reload writes into them)")
    p.add_argument("--out", default=str(REPORTS / "faults.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="load 2,000, deadline 100, durability 100, fuzz 1,000")
    p.add_argument("--skip", action="append", choices=PHASES, default=[], help="a phase not to run (repeatable)")
    p.add_argument("--load-requests", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None, help="load phase concurrency (default 32)")
    p.add_argument("--deadline-calls", type=int, default=None)
    p.add_argument("--durability-n", type=int, default=None)
    p.add_argument("--fuzz-requests", type=int, default=None)
    p.add_argument("--undecodable", type=int, default=None, help="random-bytes requests after the fuzz")
    p.add_argument("--reload-timeout", type=float, default=None, help="seconds to wait for the new version after the export")
    p.add_argument("--reload-poll-s", type=float, default=None, help="the orchestrator's reload polling period (default 2)")
    p.add_argument("--health-poll-s", type=float, default=None, help="the orchestrator's health polling period (default: its own, 1 s)")
    p.add_argument("--drift-window", type=int, default=None, help="the orchestrator's drift window in answers (default 300)")
    p.add_argument("--soak-minutes", type=float, default=None, help="length of the soak phase (default 30; --quick 0.5)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, copies, history file)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``recsys bench faults``: runs, writes the JSON, prints the table; 0 only if every target is met."""
    s = FaultSettings.quick() if args.quick else FaultSettings()
    overrides = {
        "load_requests": args.load_requests,
        "load_concurrency": args.concurrency,
        "deadline_calls": args.deadline_calls,
        "durability_n": args.durability_n,
        "fuzz_requests": args.fuzz_requests,
        "undecodable": args.undecodable,
        "reload_timeout_s": args.reload_timeout,
        "reload_poll_s": args.reload_poll_s,
        "health_poll_s": args.health_poll_s,
        "drift_window": args.drift_window,
        "soak_minutes": args.soak_minutes,
        "seed": args.seed,
    }
    s = replace(s, skip=tuple(args.skip), **{k: v for k, v in overrides.items() if v is not None})
    report = run_benchmark(s, args.artifacts, args.repo, args.data, keep=args.keep, in_place=args.in_place)
    report["conditions"]["command"] = getattr(args, "command_line", None) or " ".join(["recsys", *sys.argv[1:]])
    out = write_json(args.out, report)
    print(table(report))
    fz = report["fuzz"]
    for ex in (fz.get("internal_examples") or []) + (fz.get("crash_examples") or []) + (fz.get("other_examples") or []):
        print(f"\n{ex['rpc']} -> {ex['status']} {ex['where']}: {ex['details']}\n  request: {ex['request']}")
        if ex.get("server_traceback"):
            print("  server: " + ex["server_traceback"].replace("\n", "\n          "))
    print(f"\n{conditions_line(report['conditions'])}")
    print("targets:\n" + targets_text(report))
    print("fallback answers:\n" + "\n".join(f"  {p}: {how}" for p, how in FALLBACK_COUNTS_AS.items()))
    print(f"wrote {out}")
    failed = [t for t in all_targets(report) if t["met"] is False]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import benchmarks.faults as package  # its docstring describes the benchmark

    parser = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m benchmarks.faults", *(argv if argv is not None else sys.argv[1:])])
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
