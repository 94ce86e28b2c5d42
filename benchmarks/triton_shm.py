"""Triton system shared memory vs plain gRPC tensors, for the orchestrator's two model calls.

    python -m benchmarks.triton_shm --repo R [--requests 500] [--rounds 3] [--candidates 200]

The orchestrator and the embedded Triton share one host, so the inputs of ``user_tower`` and
``ranker_ensemble`` could travel through a POSIX shared-memory region registered with Triton
(``tritonclient.utils.shared_memory``) instead of inside the gRPC message. This starts the
embedded Triton on ``R`` (CPU configs) and times the same calls, one at a time, both ways in
turns (``--rounds`` rounds, each mode ``--requests`` calls per round, which mode goes first
alternating): inputs *and* the output in
shared memory against everything in the message. The region is written with the inputs before
each call (what the orchestrator would have to do) and the timing includes that write and the
read of the output. Medians over rounds of the per-round p50 / p99.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPORTS, LoadWatch, conditions, conditions_line, log, markdown_table, write_json

TYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


def _inputs(repo: Path, candidates: int) -> dict[str, tuple[dict[str, np.ndarray], str, list[int]]]:
    """``{model: (inputs, output name, output shape)}`` of one Recommend's two calls, random but valid."""
    import json

    from export.onnx_export import sample_candidate_inputs, sample_user_inputs

    version = max(int(p.name) for p in (repo / "user_tower").iterdir() if p.name.isdigit())
    info = json.loads((repo / "user_tower" / str(version) / "version.json").read_text())
    dims = {name: d for name, _, d in info["inputs"]}
    out_dim = int(info["outputs"][0][2][1])
    n_items = int(np.load(Path(info["artifacts"]["path"]) / "item_embeddings.npy", mmap_mode="r").shape[0])
    L = int(dims["history"][1])
    user = sample_user_inputs(1, n_items, L, (1, 1, 1), seed=1)
    ranker = sample_candidate_inputs(candidates, n_items, seed=2, users=1)
    return {
        "user_tower": (user, "user_embedding", [1, out_dim]),
        "ranker_ensemble": (ranker, "score", [candidates, 1]),
    }


class ShmCaller:
    """One call of ``model`` with inputs and output in a registered system shared-memory region."""

    def __init__(self, client: Any, model: str, inputs: dict[str, np.ndarray], output: str, out_shape: list[int]):
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self.shm, self.client, self.model = shm, client, model
        self.inputs = inputs
        sizes = [a.nbytes for a in inputs.values()]
        self.out_bytes = int(np.prod(out_shape)) * 4
        name = f"bench_{model}_{os.getpid()}"
        self.key = f"/{name}"
        self.name = name
        total = sum(sizes) + self.out_bytes
        self.handle = shm.create_shared_memory_region(name, self.key, total)
        client.register_system_shared_memory(name, self.key, total)
        self.offsets = list(np.cumsum([0, *sizes[:-1]]))
        self.tensors = []
        for (n, a), off, size in zip(inputs.items(), self.offsets, sizes):
            t = grpcclient.InferInput(n, list(a.shape), TYPES[a.dtype])
            t.set_shared_memory(name, size, offset=int(off))
            self.tensors.append(t)
        self.out_offset = sum(sizes)
        self.out_shape = out_shape
        out = grpcclient.InferRequestedOutput(output)
        out.set_shared_memory(name, self.out_bytes, offset=self.out_offset)
        self.outputs = [out]
        self.output = output

    def __call__(self) -> np.ndarray:
        self.shm.set_shared_memory_region(self.handle, list(self.inputs.values()))  # the orchestrator's write
        self.client.infer(self.model, self.tensors, outputs=self.outputs)
        return self.shm.get_contents_as_numpy(self.handle, np.float32, self.out_shape, offset=self.out_offset).copy()

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.name)
        self.shm.destroy_shared_memory_region(self.handle)


def grpc_call(client: Any, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One call with every tensor inside the gRPC messages (what the orchestrator does)."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for n, a in inputs.items():
        t = grpcclient.InferInput(n, list(a.shape), TYPES[a.dtype])
        t.set_data_from_numpy(a)
        tensors.append(t)
    return client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(output)]).as_numpy(output)


def _timed(call: Any, n: int) -> tuple[float, float]:
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="an exported model repository")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--out", default=str(REPORTS / "triton_shm.json"))
    args = p.parse_args(argv)
    import tritonclient.grpc as grpcclient

    from orchestrator.backends import TRITON_CHANNEL_ARGS
    from orchestrator.tritonserver import EmbeddedTriton

    repo = Path(args.repo)
    calls = _inputs(repo, args.candidates)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {m: {"grpc": [], "shm": []} for m in calls}
    with LoadWatch() as load, EmbeddedTriton(repo, startup_timeout=120) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url, channel_args=TRITON_CHANNEL_ARGS)
        shm_callers = {m: ShmCaller(client, m, x, out, shape) for m, (x, out, shape) in calls.items()}
        try:
            for m, (x, out, _) in calls.items():  # same answer both ways, and a warm-up
                np.testing.assert_allclose(shm_callers[m](), grpc_call(client, m, x, out), atol=1e-6)
                for _ in range(50):
                    grpc_call(client, m, x, out)
                    shm_callers[m]()
            for r in range(args.rounds):
                for m, (x, out, _) in calls.items():
                    modes = {"grpc": lambda: grpc_call(client, m, x, out), "shm": shm_callers[m]}  # noqa: B023
                    for mode in sorted(modes, reverse=bool(r % 2)):  # alternate which goes first
                        results[m][mode].append(_timed(modes[mode], args.requests))
                log(f"round {r + 1}/{args.rounds} done")
        finally:
            for c in shm_callers.values():
                c.close()
            client.close()
    rows, summary = [], {}
    for m, by_mode in results.items():
        nbytes = sum(a.nbytes for a in calls[m][0].values())
        for mode, per_round in by_mode.items():
            p50 = round(statistics.median(x[0] for x in per_round), 3)
            p99 = round(statistics.median(x[1] for x in per_round), 3)
            summary[f"{m}/{mode}"] = {"p50_ms": p50, "p99_ms": p99, "input_bytes": nbytes}
            rows.append([m, mode, nbytes, p50, p99])
    cond = conditions(requests=args.requests, rounds=args.rounds, candidates=args.candidates, repo=str(repo)) | {
        "load_average": load.record()
    }
    print(markdown_table(["model", "tensors via", "input bytes", "p50 ms", "p99 ms"], rows))
    print(conditions_line(cond))
    write_json(args.out, {"conditions": cond, "results": summary, "rounds": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
