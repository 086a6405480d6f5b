"""`unidml serve`'s HTTP JSON API on the standard library's threading HTTP server (no extra dependency).

    POST /search[?k=N]        image as the raw body or a multipart file -> top-k ids, labels, scores, paths
    GET  /healthz             model, index, limits and batching counters
    GET  /                    the page: upload a query, see its top-k gallery images
    GET  /gallery/<path>      an indexed gallery image, by its path relative to the gallery root

Every error is JSON `{"error": message, "status": code}`: 400 bad input, 403 a gallery file whose real path
left the gallery root, 404 unknown route or image, 405 wrong method, 408 a stalled body, 411/413 missing or
too large body, 500 a failure of the model or the index (logged), 503 queue full. Binds 127.0.0.1 by
default: the API has no authentication.
"""
from __future__ import annotations

import json
import mimetypes
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from unidml.errors import UserError
from unidml.serving.errors import RequestError
from unidml.serving.page import CONTENT_SECURITY_POLICY, HTML
from unidml.serving.search_service import SearchService, ServiceLimits, open_service
from unidml.serving.uploads import read_upload

GALLERY = "/gallery/"


class SearchServer(ThreadingHTTPServer):
    """A threading HTTP server holding the search service its handlers answer with; bound at construction
    (port 0: a free port, read back from `server_address`)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: SearchService) -> None:
        self.service = service
        super().__init__(address, SearchHandler)


class SearchHandler(BaseHTTPRequestHandler):
    """Routes a request to its answer; every failure becomes a JSON error with its status."""

    server: SearchServer
    server_version = "unidml-serve"
    timeout = 60  # seconds a connection may stall (a body shorter than its Content-Length)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _routes(self, path: str) -> dict[str, Callable[[], None]] | None:
        """The methods `path` answers, each with its handler; None for an unknown route."""
        if path.startswith(GALLERY):
            return {"GET": lambda: self._gallery(unquote(path[len(GALLERY):]))}
        return {"/": {"GET": self._page}, "/healthz": {"GET": self._health},
                "/search": {"POST": self._search}}.get(path)

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            path = urlsplit(self.path).path
            routes = self._routes(path)
            if routes is None:
                raise RequestError(404, f"no route {path[:200]}")
            if method not in routes:
                allowed = ", ".join(routes)
                self._json({"error": f"{method} is not allowed here (allowed: {allowed})", "status": 405}, 405,
                           {"Allow": allowed})
                return
            routes[method]()
        except RequestError as exc:
            self._json({"error": exc.message, "status": exc.status}, exc.status)
        except TimeoutError:
            self._body_read = True  # what did not come will not come: nothing to discard
            self._json({"error": f"the request body did not arrive within {self.timeout} s", "status": 408}, 408)
        except Exception as exc:  # a bug or a failed forward pass: the server keeps serving
            self.log_error("error answering %s: %r", self.path[:200], exc)
            self._json({"error": "internal error (see the server's log)", "status": 500}, 500)
        finally:
            self._discard_body()

    def _discard_body(self) -> None:
        """Read a body the answer did not need (a refused upload, a body sent to a GET route), up to 4 x the
        upload limit: closing a socket with unread data resets the connection, and the client could lose
        the answer. A larger body is left unread."""
        declared = self.headers.get("Content-Length", "0").strip()
        length = int(declared) if declared.isdigit() and not self._body_read else 0
        if length > 4 * self.server.service.limits.max_upload_bytes:
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:  # the client went away or stalled: nothing left to answer
            return

    def _search(self) -> None:
        limits = self.server.service.limits
        values = parse_qs(urlsplit(self.path).query).get("k", [str(limits.default_k)])
        if not values[-1].strip().isdigit():
            raise RequestError(400, f"k='{values[-1][:40]}': expected a positive integer")
        data = read_upload(self.headers, self.rfile, limits.max_upload_bytes)
        self._body_read = True
        self._json(self.server.service.search(data, int(values[-1])))

    def _health(self) -> None:
        self._json(self.server.service.health())

    def _page(self) -> None:
        self._send(200, HTML.encode(), "text/html; charset=utf-8",
                   {"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    def _gallery(self, relative: str) -> None:
        path = self.server.service.gallery.file(relative)
        kind = mimetypes.guess_type(path.name)[0] or ""
        self._send(200, path.read_bytes(), kind if kind.startswith("image/") else "application/octet-stream",
                   {"Cache-Control": "max-age=300"})

    def _json(self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers or {})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (malformed request line, unsupported method, ...) as JSON too."""
        self.close_connection = True
        self._json({"error": message or self.responses.get(code, ("error",))[0], "status": code}, code)


def run_server(checkpoint: str, index: str, overrides: Sequence[str], limits: ServiceLimits, *, host: str,
               port: int) -> int:
    """Serve until interrupted (Ctrl-C); prints the address it listens on."""
    service = open_service(checkpoint, index, overrides, limits)
    try:
        server = SearchServer((host, port), service)
    except OSError as exc:
        service.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {service.index.index.ntotal} indexed images on http://{bound_host}:{bound_port}/ "
          f"(POST /search, GET /healthz); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        service.close()
    return 0
