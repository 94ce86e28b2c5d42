"""``python -m orchestrator.healthcheck``: exit 0 only when the local orchestrator is SERVING.

The container health probe of docker-compose.yml (and the exec probe to use in Kubernetes
when the pod itself serves TLS). It reads the same ``RECSYS_*`` environment as the server
(:meth:`~orchestrator.settings.ServeSettings.from_env`), so it follows the server's port and
TLS without flags. API keys do not matter: the health service is always open
(``orchestrator/auth.py``). With TLS the server's own certificate is the trusted root (a
self-signed one verifies) and ``RECSYS_TLS_SERVER_NAME`` (default ``localhost``) is the
name checked against it.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Checks ``grpc.health.v1`` for the whole server; prints the status; 0 when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orchestrator.settings import ServeSettings

    settings = ServeSettings.from_env()
    port = settings.port or 50051
    target = f"localhost:{port}"
    if settings.tls_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=settings.tls_cert.read_bytes())
        name = os.environ.get("RECSYS_TLS_SERVER_NAME", "localhost")
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as exc:
        print(f"health check failed: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
