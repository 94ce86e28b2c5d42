"""gRPC channels to replicated orchestrators: retries of UNAVAILABLE by gRPC's service config.

:class:`~clients.client.RecsysClient` retries UNAVAILABLE itself (a loop in Python). Behind a
load balancer the same policy belongs in the channel, where every gRPC language gets it from
one JSON document: gRPC then re-sends a call that failed with UNAVAILABLE (a replica died
mid-call, or the balancer had no replica) after a jittered exponential backoff, within the
call's deadline, without the application seeing the first failure. Only UNAVAILABLE is
retried: it means the call was not processed (or, for RecordInteraction, that re-sending is
harmless, the write being idempotent on ``(user_id, movie_id, timestamp_s)`` when the caller
sets ``timestamp_s``). Every other status may have had effects and is final.

Use::

    channel = grpc.aio.insecure_channel(target, options=channel_options())
    client = AsyncRecsysClient(target, channel=channel, retries=0)

``round_robin=True`` adds gRPC's client-side balancing over every address a name resolves
to (e.g. ``dns:///recsys-orchestrator-headless:50051`` in Kubernetes, or
``ipv4:127.0.0.1:5001,127.0.0.1:5002``), for deployments without an L7 balancer.
"""

from __future__ import annotations

import json
from typing import Any

SERVICE = "recsys.v1.Recommender"
HEALTH_SERVICE = "grpc.health.v1.Health"
MAX_ATTEMPTS = 5
"""Attempts per call, the first included: gRPC caps ``maxAttempts`` at 5."""


def service_config(
    max_attempts: int = MAX_ATTEMPTS,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    backoff_multiplier: float = 2.0,
    round_robin: bool = False,
) -> dict[str, Any]:
    """The gRPC service config: retry UNAVAILABLE on every method of the API and of health.

    Args:
        max_attempts: Attempts per call including the first (2..5).
        initial_backoff_s: Upper bound of the first (randomised) retry delay.
        max_backoff_s: Longest retry delay.
        backoff_multiplier: Growth of the delay bound per attempt.
        round_robin: Balance calls over every resolved address (client-side).

    Returns:
        The service config as a dict (``json.dumps`` it for ``grpc.service_config``).

    Raises:
        ValueError: An argument outside gRPC's accepted range.
    """
    if not 2 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be in 2..5 (gRPC's limit), got {max_attempts}")
    if not (initial_backoff_s > 0 and max_backoff_s >= initial_backoff_s and backoff_multiplier >= 1):
        raise ValueError("need initial_backoff_s > 0, max_backoff_s >= initial_backoff_s, backoff_multiplier >= 1")
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE}, {"service": HEALTH_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    # gRPC's duration syntax: seconds with a trailing "s"
                    "initialBackoff": f"{initial_backoff_s:g}s",
                    "maxBackoff": f"{max_backoff_s:g}s",
                    "backoffMultiplier": backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return config


def channel_options(round_robin: bool = False, **retry: Any) -> list[tuple[str, Any]]:
    """Channel options carrying :func:`service_config` (retries on, the config's JSON).

    Args:
        round_robin: Client-side balancing over the resolved addresses.
        **retry: Keyword arguments of :func:`service_config`.
    """
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(round_robin=round_robin, **retry))),
        # a DNS name's address list is re-resolved when a connection drops, so a replaced
        # pod is found; keepalive notices a silently dead peer behind a balancer
        ("grpc.keepalive_time_ms", 30_000),
    ]
