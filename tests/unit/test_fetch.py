"""Verified PyPI downloads against a fake JSON API served on 127.0.0.1 (no real network)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from merit import fetch
from merit.fetch import FetchError, pypi_file

PROJECT, VERSION = "fake-proj", "1.0"
WHEEL = "fake_proj-1.0-py3-none-any.whl"
PAYLOAD = b"not really a wheel, but bytes to verify " * 5000


class FakePyPI:
    """A tiny PyPI: ``routes`` maps a path to (status, body, declared Content-Length or None)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: Counter[str] = Counter()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.hits[self.path] += 1
                status, body, length = fake.routes.get(self.path, (404, b"", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def release(self, body: bytes = PAYLOAD, sha256: str | None = None, per_version: bool = True):
        """Publish WHEEL (plus an sdist) under ``sha256`` (default: the true digest)."""
        files = []
        for name, kind in ((WHEEL, "bdist_wheel"), ("fake_proj-1.0.tar.gz", "sdist")):
            url = f"{self.base}/files/{name}"
            self.routes[f"/files/{name}"] = (200, body, None)
            digest = sha256 or hashlib.sha256(body).hexdigest()
            files.append(
                {
                    "filename": name,
                    "packagetype": kind,
                    "url": url,
                    "size": len(body),
                    "digests": {"sha256": digest},
                }
            )
        if per_version:
            doc = {"info": {"version": VERSION}, "urls": files}
            self.routes[f"/pypi/{PROJECT}/{VERSION}/json"] = (200, json.dumps(doc).encode(), None)
        doc = {"info": {"version": VERSION}, "urls": [], "releases": {VERSION: files, "0.9": []}}
        self.routes[f"/pypi/{PROJECT}/json"] = (200, json.dumps(doc).encode(), None)


@pytest.fixture
def pypi(monkeypatch):
    fake = FakePyPI()
    fake.thread.start()
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", f"{fake.base}/pypi")
    monkeypatch.setattr(fetch, "TIMEOUT_S", 10)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text
    return text


def test_good_digest_downloads_then_reuses(pypi, tmp_path):
    pypi.release()
    out = pypi_file(
        PROJECT, VERSION, tmp_path, packagetype="bdist_wheel", filename=WHEEL, progress=False
    )
    assert out == tmp_path / WHEEL
    assert out.read_bytes() == PAYLOAD
    assert pypi.hits[f"/files/{WHEEL}"] == 1
    again = pypi_file(
        PROJECT, VERSION, tmp_path, packagetype="bdist_wheel", filename=WHEEL, progress=False
    )
    assert again == out
    assert pypi.hits[f"/files/{WHEEL}"] == 1  # reused, not fetched again
    assert not list(tmp_path.glob("*.part"))


def test_reuse_works_offline_and_redownloads_a_damaged_file(pypi, tmp_path, monkeypatch):
    pypi.release()
    kw = {"packagetype": "bdist_wheel", "filename": WHEEL, "progress": False}
    out = pypi_file(PROJECT, VERSION, tmp_path, **kw)
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", f"http://127.0.0.1:{closed_port()}/pypi")
    assert pypi_file(PROJECT, VERSION, tmp_path, **kw) == out  # digest recorded at download time
    out.write_bytes(b"damaged")
    with pytest.raises(FetchError):  # damaged and offline: it must not be trusted
        pypi_file(PROJECT, VERSION, tmp_path, **kw)
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", f"{pypi.base}/pypi")
    assert pypi_file(PROJECT, VERSION, tmp_path, **kw).read_bytes() == PAYLOAD
    assert pypi.hits[f"/files/{WHEEL}"] == 2


def test_sdist_by_packagetype_and_project_json_fallback(pypi, tmp_path):
    pypi.release(per_version=False)  # the per-version document answers 404
    out = pypi_file(PROJECT, VERSION, tmp_path, progress=False)
    assert out.name == "fake_proj-1.0.tar.gz"
    assert out.read_bytes() == PAYLOAD
    assert pypi.hits[f"/pypi/{PROJECT}/{VERSION}/json"] == 1
    assert pypi.hits[f"/pypi/{PROJECT}/json"] == 1


def test_bad_digest_leaves_no_file(pypi, tmp_path):
    pypi.release(sha256="0" * 64)
    with pytest.raises(FetchError) as info:
        pypi_file(PROJECT, VERSION, tmp_path, packagetype="bdist_wheel", progress=False)
    assert "sha256 mismatch" in assert_one_line(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part


def test_cut_off_download_leaves_no_file(pypi, tmp_path):
    pypi.release()
    # The server promises more bytes than it sends, then closes the connection.
    pypi.routes[f"/files/{WHEEL}"] = (200, PAYLOAD[:1000], len(PAYLOAD))
    with pytest.raises(FetchError) as info:
        pypi_file(PROJECT, VERSION, tmp_path, packagetype="bdist_wheel", progress=False)
    assert_one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_release_or_file(pypi, tmp_path):
    pypi.release()
    with pytest.raises(FetchError) as info:
        pypi_file(PROJECT, "2.0", tmp_path, progress=False)
    assert "fake-proj==2.0" in assert_one_line(info.value)
    with pytest.raises(FetchError) as info:
        pypi_file(PROJECT, VERSION, tmp_path, packagetype="bdist_wheel", filename="nope.whl")
    assert "nope.whl" in assert_one_line(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_pypi_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", f"http://127.0.0.1:{closed_port()}/pypi")
    with pytest.raises(FetchError) as info:
        pypi_file(PROJECT, VERSION, tmp_path, progress=False)
    assert "cannot read" in assert_one_line(info.value)
    assert isinstance(info.value, OSError)
    assert not any(Path(tmp_path).iterdir())
