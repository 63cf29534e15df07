"""The review page's local web server: one video, its smile codes, the reviewer's corrections.

`serve(backend)` starts a standard-library HTTP server in a background thread,
bound to loopback, and returns it; `server.url` (with the access token) is what
the reviewer opens. Routes, and nothing else:

  GET  /                 the page (static/review.html)
  GET  /static/<name>    the page's script and style sheet (a fixed allow-list)
  GET  /video            backend.video_path, with byte ranges (seeking)
  GET  /api/session      backend.session() as JSON
  POST /api/save         backend.save(JSON body) -> the new session as JSON

Security: every request needs the token (`?token=`, the HttpOnly SameSite=Strict
cookie that the first page load sets, or `Authorization: Bearer`); the Host
header must name the loopback address (DNS rebinding); a POST with an Origin
must come from the page's own origin and be application/json (CSRF); no path
from the request ever reaches the file system; strict CSP and no caching. The
log has one line per request (method, route name, status) and never the query,
the token, or the video's name (patient data).
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

log = logging.getLogger("dyadlab.review")

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "review.html"
#: what /static/<name> may serve: name -> Content-Type (nothing else, ever)
STATIC_FILES = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
}
MAX_BODY = 1 << 20  # POST /api/save
CHUNK = 256 * 1024  # video streaming
CSP = (
    "default-src 'self'; media-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}


class Backend(Protocol):
    """What the server reviews: a local video and its smile codes."""

    video_path: Path
    video_type: str

    def session(self) -> dict: ...

    def save(self, payload: dict) -> dict: ...


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _jsonable(obj: Any) -> Any:
    """`obj` with non-finite floats as null and array-likes (numpy) as lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _jsonable(obj.tolist())
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range [first, last] of a single-range `Range` header
    (`bytes=a-b`, `bytes=a-`, `bytes=-n`) in a file of `size` bytes, or None
    when it is malformed, multiple or unsatisfiable (-> 416)."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s.isdigit() or first_s == "") or not (last_s.isdigit() or last_s == ""):
        return None
    if first_s == "":  # suffix: the last n bytes
        if last_s == "" or int(last_s) == 0 or size == 0:
            return None
        return max(0, size - int(last_s)), size - 1
    first = int(first_s)
    last = size - 1 if last_s == "" else min(int(last_s), size - 1)
    if first >= size or first > last:
        return None
    return first, last


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    backend: Backend
    token: str
    cookie_name: str
    allowed_hosts: frozenset[str] | None  # None: any Host (allow_remote)
    backend_lock: threading.Lock


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dyadlab-review"
    sys_version = ""
    timeout = 120  # a connection idle this long is closed
    route = "-"

    @property
    def srv(self) -> _Server:
        return cast(_Server, self.server)

    # -- logging: method, route name, status; never the request line ------------------------
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        method = self.command if self.command in _METHODS else "-"
        status = int(code) if isinstance(code, int) or str(code).isdigit() else 0
        log.info("%s %s %d", method, self.route, status)
        self.route = "-"

    def log_error(self, format: str, *args: Any) -> None:
        pass  # the base logs the raw request line here (query, token): the status line suffices

    def log_message(self, format: str, *args: Any) -> None:
        pass  # never the base's format (it has the request line); see log_request

    def parse_request(self) -> bool:
        self.route = "-"  # one handler serves every request of a keep-alive connection
        return super().parse_request()

    # -- responses -------------------------------------------------------------------------------
    def _start(
        self, status: int, content_type: str, length: int, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self._start(status, content_type, len(body), extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(_jsonable(obj), allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str | None = None) -> None:
        self._json(status, {"error": message or HTTPStatus(status).phrase})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the base's own errors (bad request line, unsupported method, ...): no echo of the request
        self.close_connection = True
        self.route = self.route if self.route != "-" else "bad_request"
        try:
            self._error(code)
        except OSError:
            pass

    # -- access ----------------------------------------------------------------------------------
    def _split(self) -> tuple[str, dict[str, list[str]]]:
        path, _, query = self.path.partition("?")
        return path.partition("#")[0], parse_qs(query.partition("#")[0], keep_blank_values=True)

    def _token_ok(self, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """(authorized, via the query): the query, the cookie or a Bearer header."""
        want = self.srv.token.encode()
        candidates: list[tuple[str, bool]] = [(t, True) for t in query.get("token", [])]
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append((auth[7:].strip(), False))
        # by hand: SimpleCookie gives up on the whole header at another site's odd cookie
        for header in self.headers.get_all("Cookie") or []:
            for pair in header.split(";"):
                name, eq, value = pair.strip().partition("=")
                if eq and name == self.srv.cookie_name:
                    candidates.append((value.strip().strip('"'), False))
        for got, via_query in candidates:
            if hmac.compare_digest(got.encode("utf-8", "surrogateescape"), want):
                return True, via_query
        return False, False

    def _host_ok(self) -> bool:
        allowed = self.srv.allowed_hosts
        return allowed is None or self.headers.get("Host", "").lower() in allowed

    def _dispatch(self) -> None:
        path, query = self._split()
        if not self._host_ok():
            self.route = "bad_host"
            return self._error(403)
        ok, via_query = self._token_ok(query)
        if not ok:
            self.route = "forbidden"
            return self._error(403)
        method = self.command
        if path == "/":
            self.route = "page"
            if method != "GET":
                return self._not_allowed("GET")
            return self._page(set_cookie=via_query)
        if path.startswith("/static/") and path[len("/static/") :] in STATIC_FILES:
            name = path[len("/static/") :]
            self.route = f"static:{name}"
            if method != "GET":
                return self._not_allowed("GET")
            return self._send(200, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name])
        if path == "/video":
            self.route = "video"
            if method != "GET":
                return self._not_allowed("GET")
            return self._video()
        if path == "/api/session":
            self.route = "session"
            if method != "GET":
                return self._not_allowed("GET")
            return self._call_backend(lambda: self.srv.backend.session())
        if path == "/api/save":
            self.route = "save"
            if method != "POST":
                return self._not_allowed("POST")
            return self._save()
        self.route = "not_found"
        self._error(404)

    def _not_allowed(self, allow: str) -> None:
        self.close_connection = True  # a body we do not read may follow
        self._send(405, b'{"error":"Method Not Allowed"}', "application/json", {"Allow": allow})

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # -- routes ----------------------------------------------------------------------------------
    def _page(self, *, set_cookie: bool) -> None:
        extra = {}
        if set_cookie:
            extra["Set-Cookie"] = (
                f"{self.srv.cookie_name}={self.srv.token}; Path=/; HttpOnly; SameSite=Strict"
            )
        self._send(200, (STATIC_DIR / PAGE).read_bytes(), "text/html; charset=utf-8", extra)

    def _video(self) -> None:
        path = self.srv.backend.video_path
        try:
            f = open(path, "rb")
        except OSError:
            return self._error(404)
        with f:
            size = os.fstat(f.fileno()).st_size
            headers = {"Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng is None:
                first, last, status = 0, size - 1, 200
            else:
                parsed = parse_range(rng, size)
                if parsed is None:
                    headers["Content-Range"] = f"bytes */{size}"
                    return self._send(416, b"", "text/plain", headers)
                (first, last), status = parsed, 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            self._start(status, self.srv.backend.video_type, last - first + 1, headers)
            f.seek(first)
            left = last - first + 1
            try:
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:  # the file shrank under us: the length is wrong, drop the connection
                        self.close_connection = True
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the player cancelled (seeking)
                self.close_connection = True

    def _save(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{self.headers.get('Host', '')}".lower():
            self.close_connection = True
            self.route = "save_cross_origin"
            return self._error(403)
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            return self._error(415, "Content-Type must be application/json")
        if "Transfer-Encoding" in self.headers or not self.headers.get("Content-Length", "").isdigit():
            self.close_connection = True
            return self._error(411, "Content-Length required")
        length = int(self.headers["Content-Length"])
        if length > MAX_BODY:
            self.close_connection = True
            return self._error(413, f"body over {MAX_BODY} bytes")
        try:
            payload = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "body is not valid JSON")
        if not isinstance(payload, dict):
            return self._error(400, "body must be a JSON object")
        self._call_backend(lambda: self.srv.backend.save(payload))

    def _call_backend(self, call: Callable[[], dict]) -> None:
        try:
            with self.srv.backend_lock:  # one backend call at a time
                result = call()
        except ValueError as e:  # the reviewer's input: the message is for them
            return self._error(400, str(e))
        except Exception as e:
            log.error("%s %s failed: %s", self.command, self.route, type(e).__name__)
            return self._error(500, "internal error (see the server log)")
        self._json(200, result)


class ReviewServer:
    """A bound review server; `start()` serves in a background thread."""

    def __init__(
        self,
        backend: Backend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allow_remote: bool = False,
    ) -> None:
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"review server binds loopback only, not {host!r} (allow_remote=True to override)"
            )
        if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,}", token):
            raise ValueError("token must be at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -)")
        self.token = token or secrets.token_urlsafe(32)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        bind_host = "::1" if host.lower() == "localhost" and family == socket.AF_INET6 else host.strip("[]")
        self._httpd: _Server = server_cls((bind_host, port), _Handler)
        self.port = int(self._httpd.server_address[1])
        url_host = host.strip("[]")
        if _is_ip(url_host) and ipaddress.ip_address(url_host).is_unspecified:  # 0.0.0.0, ::
            url_host = "127.0.0.1" if family == socket.AF_INET else "::1"
        netloc = f"[{url_host}]:{self.port}" if ":" in url_host else f"{url_host}:{self.port}"
        self.url = f"http://{netloc}/?token={self.token}"
        names = {netloc.lower(), f"localhost:{self.port}", f"127.0.0.1:{self.port}", f"[::1]:{self.port}"}
        httpd = self._httpd
        httpd.backend = backend
        httpd.token = self.token
        httpd.cookie_name = f"dyadlab_review_{self.port}"  # cookies ignore ports: one per server
        httpd.allowed_hosts = None if allow_remote else frozenset(names)
        httpd.backend_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Serve in a daemon thread (once; a no-op when already serving)."""
        if self._closed:
            raise RuntimeError("review server was stopped")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="dyadlab-review", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (e.g. the CLI until Ctrl-C)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ReviewServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def serve(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    allow_remote: bool = False,
) -> ReviewServer:
    """Bind (loopback unless allow_remote), start serving in the background, return the
    server: open `server.url`; `server.stop()` (or `with serve(...)`) ends it."""
    server = ReviewServer(backend, host=host, port=port, token=token, allow_remote=allow_remote)
    server.start()
    return server
