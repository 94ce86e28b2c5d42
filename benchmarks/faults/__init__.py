"""Faults and load (issue #6): the served stack under load, with Triton killed, stalled and
reloaded, the orchestrator killed, and hostile requests.

    recsys bench faults [--artifacts DIR --repo DIR] [--out FILE] [--quick] [--skip PHASE ...]

Everything runs as real processes on loopback: the embedded Triton (``orchestrator/tritonserver.py``) runs
under a ``recsys triton`` subprocess on fixed ports, so that its ``tritonserver`` pid can be
SIGKILLed, SIGSTOPped and restarted on the same ports; the orchestrator is a ``recsys serve
--triton-url ...`` subprocess on a fixed port and history file, so that it can be SIGKILLed
and restarted on both. The deployment is a *copy*
(the reload phase publishes a new version into the repository and rebuilds the FAISS bundle
in the artifacts); without ``--artifacts``/``--repo`` a tiny model is trained on
``data/ml-latest-small`` first.

Phases, in this order (each can be skipped; its JSON section then says ``"skipped": true``):

``load``
    Recommend at concurrency 32 through :class:`~clients.client.AsyncRecsysClient` (no
    retries, so nothing is hidden): known users from ``interactions.parquet`` and, for a
    share of the calls, explicit histories. Target: 0 errors.
``drift``
    Ordinary calls (known users), then explicit histories of one genre, at concurrency 8, 3
    drift windows each; the orchestrator's own ``recsys_drift_psi`` is read after each part.
    Targets: max PSI < 0.1 on ordinary traffic, > 0.25 on the shifted one, the alert
    condition (``recsys_drift_psi > 0.25``) true.
``triton_killed``
    The same load at concurrency 8; Triton is SIGKILLed mid-run, kept down until the
    orchestrator's health for ``recsys.v1.Recommender`` reads NOT_SERVING, then restarted on
    the same ports. Targets: every request answered (fallbacks count as answers), health
    turned NOT_SERVING, the first personal answer at most 5 s after Triton was ready again.
``deadline``
    Triton SIGSTOPped (alive but silent); 1,000 calls with a 50 ms deadline; SIGCONT. Targets:
    every call DEADLINE_EXCEEDED, the orchestrator's thread and fd counts
    (``/proc/PID/task``, ``/proc/PID/fd``) back to their baseline within a few seconds.
``reload``
    ``recsys export`` (version N+1 and the FAISS bundle) runs while the load goes on; the load
    continues until personal answers report the new version or a timeout. The orchestrator
    is started with ``RECSYS_RELOAD_POLL_S`` (``ServeSettings.reload_poll_s``, read by
    ``from_env``). Targets: no failed call, the new version served, no old-version answer
    once a new-version one has been seen, no ``MODEL_UNAVAILABLE`` fallback.
``durability``
    RecordInteraction for fresh users (ids above every known one) at concurrency 8; the
    orchestrator is SIGKILLed the moment the N-th acknowledgement arrives, restarted on the
    same SQLite file, and every acknowledged ``(user, movie, timestamp)`` is looked up in it.
    Target: 0 lost.
``fuzz``
    Hypothesis generates malformed and hostile requests for every RPC (huge and zero k,
    negative and int64-extreme ids, histories of up to 100,000 ids, unicode and garbage genre
    names, NaN/inf floats, inverted years, missing fields, empty messages), sent through the
    raw generated stubs so no client-side check hides anything. Every answer must be OK or a
    client-error status with a message. Targets: 0 INTERNAL/UNKNOWN (including failures
    inside BatchRecommend results, and the random-bytes bodies probed after it,
    ``fuzz.undecodable``: the server parses bodies with deserializers that never raise and
    answers undecodable ones INVALID_ARGUMENT), 0 orchestrator crashes.
``soak``
    The load's mix at concurrency 8 for ``--soak-minutes`` (30; ``--quick`` 0.5); the
    orchestrator's RSS, fds and threads (and Triton's RSS) sampled throughout. Targets: 0
    errors, RSS growth after warm-up <= 5 %, fds and threads back to their post-warm-up counts.

Output: the JSON report (``--out``): ``conditions`` and one section per phase, each with its
figures and its ``targets`` (``value``, ``wanted``, ``met``; ``met`` is null when skipped);
progress on stderr; a table, any INTERNAL/UNKNOWN request with the server's traceback, and
the targets on stdout. Exit code 0 only when every target of every phase that ran is met.
Where a popular-fallback answer counts as answered is stated per phase in
``FALLBACK_COUNTS_AS`` (``benchmarks/faults/run.py``), copied into each section as
``fallback_counts_as`` and printed after the targets.
"""

from benchmarks.faults.run import add_arguments, main, run_benchmark, run_cli
from benchmarks.faults.stack import PHASES, SECTION_KEYS

__all__ = ["PHASES", "SECTION_KEYS", "add_arguments", "main", "run_benchmark", "run_cli"]
