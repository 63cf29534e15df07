"""The review page (dyadlab/review/): its server over real HTTP, and the page in a real,
headless Chromium (Selenium, the system's chromium and chromedriver) playing a real
video. The backend is a small in-test stand-in holding a hand-written session."""

from __future__ import annotations

import copy
import http.client
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dyadlab.review.server import ReviewServer, parse_range, serve

from media import media_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FPS = 30.0
#: the hand-written automatic codes: face -> [(smile_id, start_s, end_s)]
SMILES = {
    0: [("0-0", 0.2, 0.8), ("0-1", 1.3, 2.0)],
    1: [("1-0", 0.5, 1.1), ("1-1", 1.6, 2.3)],
}
N_SMILES = sum(len(v) for v in SMILES.values())
LABELS = {0: "parent", 1: "infant"}


# -- the backend --------------------------------------------------------------------------------
def _smile(face_id: int, smile_id: str, start: float, end: float, status: str) -> dict[str, Any]:
    third = (end - start) / 3
    return {
        "smile_id": smile_id,
        "start_s": start,
        "onset_end_s": start + third,
        "offset_start_s": end - third,
        "end_s": end,
        "status": status,
        "features": {"onset_amplitude": 0.2 + 0.1 * face_id, "total_duration_s": end - start},
    }


class FakeBackend:
    """A session over the real video; `save` keeps the given boundaries, marks the
    statuses, bumps the version and records reviewer "test" (and the payload)."""

    video_type = "video/mp4"

    def __init__(self, video: Path, duration: float) -> None:
        self.video_path = video
        self.duration = duration
        self.version = 0
        self.review: dict[str, Any] | None = None
        self.payloads: list[dict[str, Any]] = []
        self.fail: Exception | None = None
        self.next_id = {f: len(v) for f, v in SMILES.items()}
        self.smiles = {f: [_smile(f, sid, a, b, "auto") for sid, a, b in rows] for f, rows in SMILES.items()}

    def _trace(self, face_id: int) -> dict[str, list[Any]]:
        n = int(round(self.duration * FPS))
        t = [i / FPS for i in range(n)]
        au12: list[float | None] = []
        for x in t:
            bumps = [
                2.5 * math.exp(-(((x - (a + b) / 2) / ((b - a) / 3)) ** 2)) for _, a, b in SMILES[face_id]
            ]
            au12.append(round(0.3 + max(bumps) + 0.1 * math.sin(7 * x + face_id), 4))
        confidence = [0.95] * n
        for i in range(n):
            if 1.05 <= t[i] < 1.25:  # a stretch the tracker lost: shaded on the page
                au12[i] = None
            if 2.25 <= t[i]:
                confidence[i] = 0.5
        au06 = [None if v is None else round(0.6 * v, 4) for v in au12]
        return {"t": t, "au12": au12, "au06": au06, "confidence": confidence}

    def session(self) -> dict:
        return {
            "title": "review",
            "video": {"duration_s": self.duration, "fps": FPS},
            "speech": [[0.1, 0.6], [1.4, 1.9]],
            "review": copy.deepcopy(self.review),
            "faces": [
                {
                    "face_id": f,
                    "label": LABELS[f],
                    "threshold": 1.5,
                    "min_confidence": 0.8,
                    "trace": self._trace(f),
                    "smiles": copy.deepcopy(self.smiles[f]),
                }
                for f in sorted(self.smiles)
            ],
        }

    def save(self, payload: dict) -> dict:
        if self.fail is not None:
            raise self.fail
        if payload.get("base_version") != self.version:
            raise ValueError(f"stale review: version {self.version} was saved since")
        self.payloads.append(copy.deepcopy(payload))
        new: dict[int, list[dict[str, Any]]] = {}
        for fp in payload["faces"]:
            f = fp["face_id"]
            if f not in self.smiles:
                raise ValueError(f"no face {f}")
            rows = []
            for s in fp["smiles"]:
                a, b = float(s["start_s"]), float(s["end_s"])
                if not 0 <= a < b <= self.duration + 1e-6:
                    raise ValueError(f"smile {s['smile_id']}: bad boundaries {a}-{b}")
                sid = s["smile_id"]
                if sid is None:
                    sid = f"{f}-{self.next_id[f]}"
                    self.next_id[f] += 1
                rows.append(_smile(f, sid, a, b, s["status"]))
            new[f] = sorted(rows, key=lambda r: r["start_s"])
        self.smiles.update(new)
        self.version += 1
        self.review = {"version": self.version, "reviewer": "test", "saved_at": "2026-12-06T09:30:00Z"}
        return self.session()


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video() -> Path:
    return media_path("single_face.mp4")


@pytest.fixture(scope="module")
def duration(video: Path) -> float:
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        assert s.duration is not None and s.time_base is not None
        return float(s.duration * s.time_base)  # 2.4 s: 72 frames at 30 fps


@pytest.fixture
def backend(video: Path, duration: float) -> FakeBackend:
    return FakeBackend(video, duration)


@pytest.fixture
def server(backend: FakeBackend, caplog: pytest.LogCaptureFixture) -> Iterator[ReviewServer]:
    caplog.set_level(logging.INFO, logger="dyadlab.review")
    with serve(backend) as s:
        yield s


def _req(
    server: ReviewServer,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def _auth(server: ReviewServer, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}", **more}


# -- the server over HTTP -----------------------------------------------------------------------------
def test_every_route_needs_the_token(server: ReviewServer, video: Path) -> None:
    for path in ("/", "/api/session", "/video", "/static/review.js", "/nothing"):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Cookie": f"dyadlab_review_{server.port}=wrong"},
        ):
            status, _, body = _req(server, "GET", path, headers)
            assert status == 403, (path, headers)
            assert video.read_bytes()[:16] not in body
        assert _req(server, "GET", path + "?token=" + server.token[:-1] + "x")[0] == 403
    assert _req(server, "POST", "/api/save", {"Content-Type": "application/json"}, b"{}")[0] == 403


def test_the_first_page_load_sets_a_strict_http_only_cookie(server: ReviewServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}/?token={server.token}"
    status, headers, body = _req(server, "GET", f"/?token={server.token}")
    assert status == 200 and b'<video id="video"' in body
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"dyadlab_review_{server.port}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # later requests: the cookie alone, or a Bearer header
    odd = {"Cookie": 'other={"a b": 1}; x=y z; ' + cookie.split(";")[0]}  # another local app's cookies
    for h in ({"Cookie": cookie.split(";")[0]}, odd, _auth(server)):
        status, headers, body = _req(server, "GET", "/api/session", h)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        session = json.loads(body)
        assert [f["face_id"] for f in session["faces"]] == [0, 1] and session["review"] is None
        assert "Set-Cookie" not in headers


def test_security_headers(server: ReviewServer) -> None:
    for path in ("/", "/api/session", "/static/review.js", "/static/review.css", "/video", "/nope"):
        status, h, _ = _req(server, "GET", path, _auth(server))
        csp = h["Content-Security-Policy"]
        for directive in (
            "default-src 'self'",
            "media-src 'self'",
            "img-src 'self' data:",
            "style-src 'self'",
            "script-src 'self'",
        ):
            assert directive in csp, (path, csp)
        assert "unsafe" not in csp
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        assert h["Cache-Control"] == "no-store"
    assert _req(server, "GET", "/static/review.js", _auth(server))[1]["Content-Type"].startswith(
        "text/javascript"
    )


def test_video_byte_ranges(server: ReviewServer, video: Path) -> None:
    data = video.read_bytes()
    size = len(data)
    status, h, body = _req(server, "GET", "/video", _auth(server))
    assert status == 200 and body == data
    assert h["Accept-Ranges"] == "bytes" and h["Content-Type"] == "video/mp4"
    assert int(h["Content-Length"]) == size

    status, h, body = _req(server, "GET", "/video", _auth(server, Range="bytes=0-99"))
    assert status == 206 and body == data[:100]
    assert h["Content-Range"] == f"bytes 0-99/{size}" and h["Content-Length"] == "100"

    status, h, body = _req(server, "GET", "/video", _auth(server, Range="bytes=-100"))
    assert status == 206 and body == data[-100:]
    assert h["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"

    status, h, body = _req(server, "GET", "/video", _auth(server, Range=f"bytes={size - 10}-"))
    assert status == 206 and body == data[-10:]
    status, h, body = _req(server, "GET", "/video", _auth(server, Range=f"bytes=100-{size + 500}"))
    assert status == 206 and body == data[100:] and h["Content-Range"] == f"bytes 100-{size - 1}/{size}"

    for bad in (
        f"bytes={size}-",
        "bytes=50-10",
        "bytes=abc",
        "bytes=-0",
        "items=0-1",
        "bytes=0-1,5-6",
        "bytes=-",
    ):
        status, h, body = _req(server, "GET", "/video", _auth(server, Range=bad))
        assert status == 416, bad
        assert h["Content-Range"] == f"bytes */{size}" and body == b""


def test_the_page_names_no_outside_resource() -> None:
    static = Path(__file__).resolve().parents[1] / "dyadlab" / "review" / "static"
    for name in ("review.html", "review.js", "review.css"):
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", (static / name).read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # the SVG namespace: a name, not a fetch


def test_parse_range() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=-100", 50) == (0, 49)
    assert parse_range("bytes=990-", 1000) == (990, 999)
    assert parse_range("bytes=0-0", 0) is None


def test_no_path_from_the_request_reaches_the_file_system(server: ReviewServer, video: Path) -> None:
    server_py = (Path(__file__).resolve().parents[1] / "dyadlab" / "review" / "server.py").read_bytes()
    passwd = Path("/etc/passwd").read_bytes()
    for path in (
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/%2E%2E%2Fserver.py",
        "/static/..%2fserver.py",
        "/static/review.html",  # the page is only served at /
        "/static//etc/passwd",
        "/static/",
        "/etc/passwd",
        "//etc/passwd",
        "/../../../../etc/passwd",
        "/video/../x",
        "/video/",
        "/api/session/../../server.py",
        "/static/review.js/..",
        "/server.py",
    ):
        status, _, body = _req(server, "GET", path, _auth(server))
        assert status in (403, 404), path
        assert server_py[:50] not in body and b"root:" not in body and passwd[:20] not in body, path
        assert video.read_bytes()[:16] not in body, path


def test_save_over_http(server: ReviewServer, backend: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    json_ct = {"Content-Type": "application/json"}
    payload = {"base_version": 0, "faces": [{"face_id": 0, "smiles": []}]}
    body = json.dumps(payload).encode()
    # CSRF: a form's content type, or another origin
    assert _req(server, "POST", "/api/save", _auth(server, **{"Content-Type": "text/plain"}), body)[0] == 415
    evil = _auth(server, Origin="http://evil.example", **json_ct)
    assert _req(server, "POST", "/api/save", evil, body)[0] == 403
    assert _req(server, "GET", "/api/save", _auth(server))[0] == 405
    assert _req(server, "POST", "/api/session", _auth(server, **json_ct), body)[0] == 405
    # over 1 MiB: refused from the header, before the body is read
    big = _auth(server, **json_ct, **{"Content-Length": str((1 << 20) + 1)})
    assert _req(server, "POST", "/api/save", big, b"{}")[0] == 413
    status, _, out = _req(server, "POST", "/api/save", _auth(server, **json_ct), b"{not json")
    assert status == 400 and "JSON" in json.loads(out)["error"]
    assert _req(server, "POST", "/api/save", _auth(server, **json_ct), b"[1]")[0] == 400
    assert backend.payloads == []
    # the backend's ValueError: 400 with its message; anything else: 500, generic
    stale = json.dumps({**payload, "base_version": 7}).encode()
    status, _, out = _req(server, "POST", "/api/save", _auth(server, **json_ct), stale)
    assert status == 400 and json.loads(out) == {"error": "stale review: version 0 was saved since"}
    backend.fail = RuntimeError("secret detail /data/patient-17.mp4")
    status, _, out = _req(server, "POST", "/api/save", _auth(server, **json_ct), body)
    assert status == 500 and "secret" not in out.decode() and "patient" not in out.decode()
    assert "RuntimeError" in caplog.text and "patient" not in caplog.text
    backend.fail = None
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    status, _, out = _req(server, "POST", "/api/save", _auth(server, **json_ct, **origin), body)
    assert status == 200
    new = json.loads(out)
    assert new["review"]["version"] == 1 and new["review"]["reviewer"] == "test"
    assert [len(f["smiles"]) for f in new["faces"]] == [0, len(SMILES[1])]
    assert backend.payloads == [payload]


def test_dns_rebinding_host_is_refused(server: ReviewServer) -> None:
    h = _auth(server, Host=f"evil.example:{server.port}")
    assert _req(server, "GET", "/api/session", h)[0] == 403
    assert _req(server, "GET", "/api/session", _auth(server, Host=f"localhost:{server.port}"))[0] == 200


def test_binds_loopback_only(backend: FakeBackend) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        with pytest.raises(ValueError, match="loopback"):
            serve(backend, host=host)
    with pytest.raises(ValueError, match="token"):
        serve(backend, token="short")
    with serve(backend, token="t" * 20) as s:
        assert s.url.endswith("?token=" + "t" * 20)
        assert s._httpd.server_address[0] == "127.0.0.1"
    with serve(backend, host="0.0.0.0", allow_remote=True) as s:  # an explicit choice
        assert s.url.startswith("http://127.0.0.1:")
        assert _req(s, "GET", "/api/session", _auth(s))[0] == 200


def test_the_log_has_no_token_query_or_file_name(
    server: ReviewServer, video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _req(server, "GET", f"/?token={server.token}")
    _req(server, "GET", "/video?token=" + server.token, {"Range": "bytes=0-9"})
    _req(server, "GET", "/etc/passwd?token=" + server.token)
    _req(server, "GET", "/api/session?secret=1")
    # a malformed request line: the base class would log it whole
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /?token={server.token} HTTP/1.1 {video.name}\r\n\r\n".encode())
        reply = sock.recv(4096)
    assert b"Bad Request" in reply  # (an unparsable request line gets an HTTP/0.9 reply: no status line)
    assert server.token.encode() not in reply
    time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "dyadlab.review"]
    assert "GET page 200" in lines and "GET video 206" in lines and "GET not_found 404" in lines
    assert "GET forbidden 403" in lines and any(" 400" in line for line in lines)
    text = caplog.text
    for secret in (
        server.token,
        server.token[:12],
        "token=",
        "secret",
        video.name,
        video.stem,
        str(video.parent),
    ):
        assert secret not in text, secret


# -- the page in a browser ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"needs the system Chromium and its driver ({', '.join(missing)} missing): apt-get install chromium-driver"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (the test group's pin)"
    )
    from selenium.webdriver.chrome.service import Service

    old = os.environ.get("SE_AVOID_STATS")
    os.environ["SE_AVOID_STATS"] = "true"  # no usage statistics; the driver path below: no Selenium Manager
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in the container
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        "--force-device-scale-factor=1",
        "--autoplay-policy=no-user-gesture-required",
        "--mute-audio",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        d.set_script_timeout(20)
        yield d
    finally:
        d.quit()
        if old is None:
            os.environ.pop("SE_AVOID_STATS", None)
        else:
            os.environ["SE_AVOID_STATS"] = old


def _wait(cond, what: str, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _open(driver: Any, server: ReviewServer) -> None:
    driver.get(server.url)
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), "the session")
    _wait(
        lambda: driver.execute_script("return document.getElementById('video').readyState >= 2"), "video data"
    )


def _smiles(driver: Any) -> list[tuple[str, str, str]]:
    """(face id, smile id, class) of each smile element on the page."""
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-smile-id]')].map("
        "e => [e.dataset.faceId, e.dataset.smileId, e.getAttribute('class')])"
    )


def _smile_el(driver: Any, smile_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'[data-smile-id="{smile_id}"]')


def _current_time(driver: Any) -> float:
    return float(driver.execute_script("return document.getElementById('video').currentTime"))


def _keys(driver: Any, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for k in keys:
        ActionChains(driver).send_keys(k).perform()


def _status(driver: Any) -> str:
    return driver.execute_script("return document.getElementById('status').textContent")


def _dirty(driver: Any) -> bool:
    return not driver.execute_script("return document.getElementById('dirty').hidden")


def test_the_page_shows_the_session_and_plays_the_video(
    driver: Any, server: ReviewServer, backend: FakeBackend
) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(driver, server)
    assert "token" not in driver.current_url  # out of the address bar and history
    smiles = _smiles(driver)
    assert len(smiles) == N_SMILES
    assert sorted((f, s) for f, s, _ in smiles) == sorted(
        (str(f), sid) for f, rows in SMILES.items() for sid, _, _ in rows
    )
    assert all("status-auto" in c for _, _, c in smiles)
    page = driver.execute_script(
        "const q = s => document.querySelectorAll(s).length;"
        "return {tracks: q('.track svg'), labels: [...document.querySelectorAll('.track-label')].map(e => e.textContent),"
        " phases: q('.smile .onset') + q('.smile .apex') + q('.smile .offset'), au12: q('polyline.au12'),"
        " au06: q('polyline.au06'), threshold: q('line.threshold'), lowconf: q('rect.lowconf'),"
        " speech: q('rect.speech'), playhead: q('line.playhead'), help: document.getElementById('help').textContent}"
    )
    assert (
        page["tracks"] == 2
        and page["labels"][0].startswith("parent")
        and page["labels"][1].startswith("infant")
    )
    assert page["phases"] == 3 * N_SMILES
    assert page["au12"] >= 4 and page["au06"] >= 4  # a gap (not measured) splits each trace in two
    assert page["threshold"] == 2 and page["lowconf"] >= 4 and page["speech"] == 4 and page["playhead"] == 2
    for key in ("Space", "J", "K", "D", "A", "[", "]", "N", "S"):
        assert key in page["help"]
    assert "not reviewed" in _status(driver) and not _dirty(driver)
    # air-gapped: everything the page loaded came from the server
    origins = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(origins) == {f"http://127.0.0.1:{server.port}"}

    # it plays, and the playhead follows
    assert (
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1], v = document.getElementById('video');"
            "v.muted = true; v.play().then(() => done(true), e => done(String(e)));"
        )
        is True
    )
    _wait(lambda: _current_time(driver) > 0.3, "the video to play")
    driver.execute_script("document.getElementById('video').pause()")
    t = _current_time(driver)
    x = float(driver.execute_script("return +document.querySelector('line.playhead').getAttribute('x1')"))
    width = float(driver.execute_script("return document.querySelector('.track svg').viewBox.baseVal.width"))
    assert x == pytest.approx(t / backend.duration * width, abs=width * 0.03)

    # Space plays and pauses; the arrows step one frame
    _keys(driver, Keys.SPACE)
    _wait(lambda: not driver.execute_script("return document.getElementById('video').paused"), "Space: play")
    _keys(driver, Keys.SPACE)
    _wait(lambda: driver.execute_script("return document.getElementById('video').paused"), "Space: pause")
    driver.execute_script("document.getElementById('video').currentTime = 1.0")
    _keys(driver, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert _current_time(driver) == pytest.approx(1.0 + 2 / FPS, abs=1e-3)
    _keys(driver, Keys.ARROW_LEFT)
    assert _current_time(driver) == pytest.approx(1.0 + 1 / FPS, abs=1e-3)


def test_clicking_a_smile_selects_it_and_seeks(driver: Any, server: ReviewServer) -> None:
    _open(driver, server)
    for face_id, rows in SMILES.items():
        for sid, start, _ in rows:
            _smile_el(driver, sid).click()
            assert "selected" in _smile_el(driver, sid).get_attribute("class")
            _wait(lambda: abs(_current_time(driver) - start) < 0.1, f"the seek to {sid}")  # noqa: B023
            assert sum("selected" in c for _, _, c in _smiles(driver)) == 1
            details = driver.find_element("id", "details").text
            assert sid in details and LABELS[face_id] in details


def test_delete_add_save_and_reload(driver: Any, server: ReviewServer, backend: FakeBackend) -> None:
    _open(driver, server)
    _smile_el(driver, "0-1").click()
    _keys(driver, "d")
    assert [s for _, s, _ in _smiles(driver)].count("0-1") == 0 and len(_smiles(driver)) == N_SMILES - 1
    assert _dirty(driver)
    driver.execute_script("document.getElementById('video').currentTime = 0.9")
    _keys(driver, "n")
    added = [(f, s, c) for f, s, c in _smiles(driver) if "status-added" in c]
    assert len(added) == 1 and added[0][0] == "0" and "selected" in added[0][2]
    assert len(_smiles(driver)) == N_SMILES
    assert backend.payloads == []

    _keys(driver, "s")
    _wait(lambda: _status(driver) == "saved v1 by test", "the save")
    assert not _dirty(driver)
    [payload] = backend.payloads
    assert payload["base_version"] == 0
    got = {f["face_id"]: f["smiles"] for f in payload["faces"]}
    assert [s["smile_id"] for s in got[0]] == ["0-0", None]
    assert [s["smile_id"] for s in got[1]] == ["1-0", "1-1"]
    new = got[0][1]
    assert new["status"] == "added"
    assert new["start_s"] == pytest.approx(0.9, abs=1e-3) and new["end_s"] == pytest.approx(1.9, abs=1e-3)
    for f, sid, a, b in [(0, "0-0", 0.2, 0.8), (1, "1-0", 0.5, 1.1), (1, "1-1", 1.6, 2.3)]:
        [s] = [s for s in got[f] if s["smile_id"] == sid]
        assert (s["start_s"], s["end_s"], s["status"]) == (a, b, "auto")
    # the page shows the backend's answer: the new smile has its id now
    ids = sorted(s for _, s, _ in _smiles(driver))
    assert ids == ["0-0", "0-2", "1-0", "1-1"]

    driver.refresh()
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), "the reload")
    after = _smiles(driver)
    assert sorted(s for _, s, _ in after) == ["0-0", "0-2", "1-0", "1-1"]
    assert [s for _, s, c in after if "status-added" in c] == ["0-2"]
    assert _status(driver).startswith("last saved v1 by test")


def test_accept_boundaries_and_a_failed_save(driver: Any, server: ReviewServer, backend: FakeBackend) -> None:
    _open(driver, server)
    _smile_el(driver, "1-0").click()  # the infant's track is active now
    _keys(driver, "a")
    assert "status-accepted" in _smile_el(driver, "1-0").get_attribute("class")
    _keys(driver, "k")  # the next smile on the track: 1-1, and the video goes to its start
    assert "selected" in _smile_el(driver, "1-1").get_attribute("class")
    _wait(lambda: abs(_current_time(driver) - 1.6) < 0.1, "K's seek")
    _keys(driver, "j")
    assert "selected" in _smile_el(driver, "1-0").get_attribute("class")
    _keys(driver, "k")
    driver.execute_script("document.getElementById('video').currentTime = 1.7")
    _keys(driver, "[")
    driver.execute_script("document.getElementById('video').currentTime = 2.2")
    _keys(driver, "]")
    assert "status-edited" in _smile_el(driver, "1-1").get_attribute("class")
    driver.execute_script("document.getElementById('video').currentTime = 0.1")
    _keys(driver, "]")  # an end before the start: refused
    assert "end must be after" in _status(driver)

    backend.fail = ValueError("smiles overlap at 1.70 s")
    _keys(driver, "s")
    _wait(lambda: "save failed" in _status(driver), "the failed save")
    assert "smiles overlap at 1.70 s" in _status(driver) and _dirty(driver)
    backend.fail = None
    _keys(driver, "s")
    _wait(lambda: _status(driver) == "saved v1 by test", "the save")
    [payload] = backend.payloads
    got = {s["smile_id"]: s for f in payload["faces"] for s in f["smiles"]}
    assert got["1-0"]["status"] == "accepted" and got["1-1"]["status"] == "edited"
    assert got["1-1"]["start_s"] == pytest.approx(1.7, abs=1e-3) and got["1-1"]["end_s"] == pytest.approx(
        2.2, abs=1e-3
    )
    assert {s["status"] for sid, s in got.items() if sid.startswith("0-")} == {"auto"}


def test_screenshot(driver: Any, server: ReviewServer, tmp_path: Path) -> None:
    from PIL import Image

    _open(driver, server)
    _smile_el(driver, "1-0").click()
    _keys(driver, "a")
    driver.execute_script("document.getElementById('video').currentTime = 0.8")
    _wait(
        lambda: driver.execute_script(
            "const v = document.getElementById('video'); return !v.seeking && v.readyState >= 3"
        ),
        "the frame at 0.8 s",
    )
    time.sleep(1.0)  # the player's seek spinner fades, the playhead moves
    png = driver.get_screenshot_as_png()
    out = tmp_path / "review.png"
    out.write_bytes(png)
    if os.environ.get("DYADLAB_REVIEW_SCREENSHOT"):
        shutil.copyfile(out, os.environ["DYADLAB_REVIEW_SCREENSHOT"])

    img = Image.open(io.BytesIO(png)).convert("RGB")
    view = driver.execute_script("return [window.innerWidth, window.innerHeight, window.devicePixelRatio]")
    assert img.size == (round(view[0] * view[2]), round(view[1] * view[2]))
    import numpy as np

    px = np.asarray(img).astype(float)
    assert px.std() > 20, "the screenshot is blank"
    # the smile colour (an automatic smile's apex) inside the timeline
    fill = driver.execute_script(
        "return getComputedStyle(document.querySelector('.smile.status-auto .apex')).fill"
    )
    rgb = np.array([float(v) for v in fill[fill.index("(") + 1 : fill.index(")")].split(",")[:3]])
    box = driver.execute_script(
        "const r = document.getElementById('timeline').getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom].map(v => v * devicePixelRatio)"
    )
    x0, y0, x1, y1 = (int(v) for v in box)
    assert y1 <= img.size[1], "the timeline is below the fold"
    region = px[y0:y1, x0:x1]
    assert (np.abs(region - rgb).max(axis=2) < 8).sum() > 100, f"no {fill} in the timeline"
    # and the video frame is there: not one colour
    vbox = driver.execute_script(
        "const r = document.getElementById('video').getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]"
    )
    frame = px[int(vbox[1]) : int(vbox[3]), int(vbox[0]) : int(vbox[2])]
    assert frame.size and frame.std() > 20
