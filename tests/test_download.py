"""The downloader against a local HTTP server on 127.0.0.1 (no outside network)."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from embeddings.download import Downloader, file_sha256, resolve_local, safe_filename


def _jpeg(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="JPEG")
    return buffer.getvalue()


GOOD = _jpeg()
HITS: Counter[str] = Counter()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        HITS[self.path] += 1
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/blue/"):
            self._send(200, _jpeg("blue"))
        elif name == "to-ftp.jpg" or name == "to-http.jpg":
            self.send_response(302)
            target = "ftp://127.0.0.1/pic.jpg" if name == "to-ftp.jpg" else "/img/good-redirected.jpg"
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif name.startswith("good"):
            self._send(200, GOOD)
        elif name == "missing.jpg":
            self._send(404, b"not found")
        elif name == "flaky.jpg":
            self._send(503, b"busy") if HITS[self.path] == 1 else self._send(200, GOOD)
        elif name == "slow.jpg":
            time.sleep(1.5)
            self._send(200, GOOD)
        elif name == "truncated.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD[:100])
            self.wfile.flush()
            self.close_connection = True
        elif name == "drip.jpg":  # one byte every 0.1 s: never trips a per-read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            try:
                for byte in GOOD:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif name == "corrupt.jpg":
            self._send(200, b"<html>this is not an image</html>")
        elif name == "huge.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(50_000_000_000))
            self.end_headers()
            self.wfile.write(b"\xff" * 1000)
        else:
            self._send(200, GOOD)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (the timeout case): expected
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_outcome_recorded_nothing_escapes(server: str, tmp_path: Path) -> None:
    HITS.clear()
    folder = tmp_path / "images"
    rows = [
        (1, f"{server}/img/good1.jpg"),
        (2, f"{server}/img/missing.jpg"),
        (3, f"{server}/img/slow.jpg"),
        (4, f"{server}/img/truncated.jpg"),
        (5, f"{server}/img/corrupt.jpg"),
        (6, f"{server}/img/huge.jpg"),
        (7, f"{server}/img/../../../../escape.jpg"),
        (8, f"{server}/img/..%2F..%2Fsneaky.jpg"),
        (9, "file:///etc/passwd"),
        (10, f"{server}/img/flaky.jpg"),
        (11, None),
    ]
    downloader = Downloader(folder, timeout_s=0.5, retries=1, max_bytes=1_000_000, workers=4, backoff_s=0.01)
    outcomes = {o.sample_id: o for o in downloader.fetch_all(rows, progress=False)}
    status = {sid: o.status for sid, o in outcomes.items()}
    assert status == {1: "ok", 2: "http_error", 3: "timeout", 4: "error", 5: "not_image", 6: "too_large",
                      7: "ok", 8: "ok", 9: "invalid_url", 10: "ok", 11: "invalid_url"}
    assert outcomes[2].error == "HTTP 404" and HITS["/img/missing.jpg"] == 1  # a 404 is not retried
    assert HITS["/img/flaky.jpg"] == 2  # a 503 is
    assert "declared size" in outcomes[6].error
    assert outcomes[1].sha256 and outcomes[1].bytes == len(GOOD)
    # Every file written lies inside the folder; no temp files are left behind.
    written = {p.name for p in folder.iterdir()}
    assert written == {Path(o.path).name for o in outcomes.values() if o.status == "ok"}
    assert all(Path(o.path).resolve().parent == folder.resolve() for o in outcomes.values() if o.path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and folder not in p.parents]

    # A rerun downloads only what failed: the good files are served from disk.
    HITS.clear()
    again = {o.sample_id: o for o in downloader.fetch_all(rows, progress=False)}
    assert again[1].status == "cached" and again[10].status == "cached"
    assert HITS["/img/good1.jpg"] == 0 and HITS["/img/missing.jpg"] == 1


def test_safe_filename() -> None:
    assert safe_filename("https://m.media-amazon.com/images/I/71XiNuac-YL.jpg") == "71XiNuac-YL.jpg"
    assert safe_filename("https://h/a/../..") is None
    assert safe_filename("https://h/a/%2e%2e%2f%2e%2e%2fetc%2fpasswd") == "passwd"
    assert safe_filename("ftp://h/a.jpg") is None
    assert "/" not in (safe_filename("https://h/a/..%5C..%5Cwin.jpg") or "")


def test_resolve_local_uses_shipped_images() -> None:
    folder = Path(__file__).parents[1] / "data" / "sample" / "images"
    outcome = resolve_local(folder, 1, "https://m.media-amazon.com/images/I/21DflYyJ4PL.jpg")
    assert outcome.status == "local" and outcome.bytes > 0
    assert resolve_local(folder, 2, "https://m.media-amazon.com/images/I/nope.jpg").status == "missing"


def test_two_urls_with_one_basename_get_two_files(server: str, tmp_path: Path) -> None:
    """Audit case: `/a/pic.jpg` and `/b/pic.jpg` were saved to one file, so one product got the other's image
    and its recorded sha256 did not match the file."""
    downloader = Downloader(tmp_path, timeout_s=2, retries=0, workers=2)
    rows = [(1, f"{server}/red/pic.jpg"), (2, f"{server}/blue/pic.jpg")]
    outcomes = {o.sample_id: o for o in downloader.fetch_all(rows, progress=False)}
    assert outcomes[1].status == outcomes[2].status == "ok"
    assert outcomes[1].path != outcomes[2].path
    for outcome in outcomes.values():  # each file still holds what its own URL served
        assert file_sha256(Path(outcome.path)) == outcome.sha256
    assert outcomes[1].sha256 != outcomes[2].sha256
    again = {o.sample_id: o for o in downloader.fetch_all(rows, progress=False)}
    assert again[1].status == "cached" and again[2].sha256 == outcomes[2].sha256


def test_redirects_only_to_http(server: str, tmp_path: Path) -> None:
    downloader = Downloader(tmp_path, timeout_s=2, retries=0, workers=2)
    rows = [(1, f"{server}/img/to-ftp.jpg"), (2, f"{server}/img/to-http.jpg")]
    outcomes = {o.sample_id: o for o in downloader.fetch_all(rows, progress=False)}
    assert outcomes[1].status == "invalid_url" and "ftp://" in outcomes[1].error
    assert outcomes[2].status == "ok"


def test_a_server_that_drips_one_byte_at_a_time_hits_the_per_file_deadline(server: str, tmp_path: Path) -> None:
    """Audit case (issue 22): a server sending 1 byte/s stalled a download 40 s despite a 2 s timeout (each read
    got its byte in time). Every attempt now has a deadline for the whole file (images.deadline_s)."""
    downloader = Downloader(tmp_path, timeout_s=2, retries=0, workers=1, deadline_s=1.0)
    start = time.perf_counter()
    outcome = downloader.fetch_all([(1, f"{server}/img/drip.jpg")], progress=False)[0]
    assert outcome.status == "timeout" and "deadline_s" in outcome.error
    assert time.perf_counter() - start < 3.0
    assert not list(tmp_path.iterdir())  # no partial file left
