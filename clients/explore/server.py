"""The explorer's HTTP server: the page's files and its JSON endpoints, on 127.0.0.1 only.

Built on the standard library's ``http.server`` (``ThreadingHTTPServer``): one person's
browser makes a handful of small requests, so a framework would add a dependency and
nothing the page needs. The page (``static/``: one HTML file, one script, one style sheet)
is read into memory at start and served by this process: no CDN, no build step.

Read-only: GET and HEAD only. The explorer holds the API key, never the browser; requests
whose ``Host`` is not this loopback address are refused, so a web page elsewhere cannot
reach the key through DNS rebinding.

=====================  ==============================================================
``/``                  the page (``/?user=1`` opens that user's recommendations)
``/static/NAME``       its script and style sheet
``/api/info``          target, the server's health, the item table's size and genres
``/api/recommend``     Recommend (parameters: :mod:`clients.explore.queries`)
``/api/similar``       Similar
``/api/popular``       Popular
``/api/movies``        title search (``q``) or lookup (``ids``) in the item table
=====================  ==============================================================

A failed call answers ``{"error": {"code", "message", "request_id", "source"}}`` with the
HTTP status of its gRPC code (:data:`HTTP_STATUS`); ``message`` is the API's own text.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc

from clients.errors import RecsysRpcError
from clients.explore.queries import BadParameter, Explorer, Query

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""The explorer binds to loopback only: it holds the API key and has no login of its own."""

STATIC_DIR = Path(__file__).with_name("static")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

HTTP_STATUS: dict[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}
"""HTTP status of a failed API call, by gRPC code (anything else: 502, the upstream failed)."""


def load_static(folder: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The page's files by URL path (``/`` is ``index.html``), with their content types."""
    files = {f"/static/{p.name}": (p.read_bytes(), _TYPES[p.suffix]) for p in sorted(folder.iterdir()) if p.suffix in _TYPES}
    files["/"] = files.pop("/static/index.html")
    return files


def _error(code: str, message: str, request_id: str | None = None, source: str = "api") -> dict:
    return {"error": {"code": code, "message": message, "request_id": request_id, "source": source}}


class _Handler(BaseHTTPRequestHandler):
    """One request; the server carries the :class:`Explorer` and the static files."""

    server: ExplorerServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page's calls reuse one connection

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, head_only: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", head_only)

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        return host in ("127.0.0.1", "localhost", "[::1]")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._get(head_only=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head_only=False)

    def _refuse(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, _error("METHOD_NOT_ALLOWED", "the explorer is read-only: GET only", source="explorer"))

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _get(self, head_only: bool) -> None:
        if not self._host_allowed():
            self._json(HTTPStatus.FORBIDDEN, _error("FORBIDDEN", "use http://127.0.0.1:PORT/", source="explorer"), head_only)
            return
        url = urlsplit(self.path)
        if url.path in self.server.static:
            body, content_type = self.server.static[url.path]
            self._send(HTTPStatus.OK, body, content_type, head_only)
            return
        endpoint = self.server.endpoints.get(url.path)
        if endpoint is None:
            self._json(HTTPStatus.NOT_FOUND, _error("NOT_FOUND", f"no page {url.path}", source="explorer"), head_only)
            return
        status, payload = self.server.answer(endpoint, parse_qs(url.query, keep_blank_values=True))
        self._json(status, payload, head_only)


class ExplorerServer(ThreadingHTTPServer):
    """The HTTP server of one :class:`Explorer`.

    Args:
        explorer: Answers the JSON endpoints.
        port: TCP port on 127.0.0.1; 0 picks a free one (read :attr:`port`).
    """

    daemon_threads = True  # a browser's idle keep-alive connection must not block shutdown

    def __init__(self, explorer: Explorer, port: int = 0):
        super().__init__((HOST, port), _Handler)
        self.explorer = explorer
        self.static = load_static()
        self.endpoints: dict[str, Callable[[Query], dict]] = {
            "/api/info": lambda q: explorer.info(),
            "/api/recommend": explorer.recommend,
            "/api/similar": explorer.similar,
            "/api/popular": explorer.popular,
            "/api/movies": explorer.search,
        }
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://{HOST}:{self.port}/"

    def answer(self, endpoint: Callable[[Query], dict], query: Query) -> tuple[int, dict]:
        """Runs one endpoint; every failure becomes a JSON error a person can read."""
        try:
            return HTTPStatus.OK, endpoint(query)
        except RecsysRpcError as exc:
            return HTTP_STATUS.get(exc.code, HTTPStatus.BAD_GATEWAY), _error(exc.code.name, exc.details, exc.request_id)
        except BadParameter as exc:
            return HTTPStatus.BAD_REQUEST, _error("INVALID_ARGUMENT", str(exc), source="explorer")
        except LookupError as exc:
            return HTTPStatus.NOT_FOUND, _error("NOT_FOUND", str(exc), source="explorer")
        except TypeError as exc:  # the client refused the arguments before any call
            return HTTPStatus.BAD_REQUEST, _error("INVALID_ARGUMENT", str(exc), source="explorer")
        except Exception as exc:  # a defect here must still reach the page, not blank it
            log.exception("explorer endpoint failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, _error("INTERNAL", f"{type(exc).__name__}: {exc}", source="explorer")

    def start(self) -> ExplorerServer:
        """Serves on a background thread (tests and embedding); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name="explorer-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket (the client is the caller's to close)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()


def create_server(explorer: Explorer, port: int = 0) -> tuple[ExplorerServer, int]:
    """The explorer's HTTP server bound on 127.0.0.1 (not yet serving) and its port."""
    server = ExplorerServer(explorer, port)
    return server, server.port
