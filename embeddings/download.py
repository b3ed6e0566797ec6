"""Image downloader: a thread pool with per-host politeness, retries with backoff, timeouts and a size cap.

Downloaded files are named by a hash of the whole URL plus its sanitised basename, so two URLs with one basename
(`/a/pic.jpg`, `/b/pic.jpg`) never share a file, and the resolved path must stay inside the image folder, so no
URL can write elsewhere. Redirects are followed to http(s) URLs only. Downloads go to a temp file that is renamed
only when complete. Files already present and decodable are skipped, so a rerun fetches only what failed.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from featurestore.store import file_sha256

SAFE_NAME = re.compile(r"[^A-Za-z0-9._+\-]")
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "pricestack-image-fetcher/0.1"


@dataclass
class FetchOutcome:
    sample_id: object
    url: str | None
    path: str | None
    status: str  # ok | cached | local | missing | http_error | timeout | too_large | invalid_url | not_image | error
    bytes: int | None
    sha256: str | None
    error: str | None


def safe_filename(url: str) -> str | None:
    """URL basename with unsafe characters replaced; None when nothing usable is left ('', '.', '..')."""
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        return None
    base = unquote(parsed.path).replace("\\", "/").rsplit("/", 1)[-1]
    name = SAFE_NAME.sub("_", base).lstrip(".")
    return name[:200] or None


def download_filename(url: str) -> str | None:
    """`<sha256(url)[:16]>-<basename>`: unique per URL, still readable."""
    name = safe_filename(url)
    if name is None:
        return None
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"[:200]


class RefusedRedirect(Exception):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an image link may only lead to another http(s) URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urlparse(newurl).scheme not in {"http", "https"}:
            raise RefusedRedirect(f"redirect to {newurl!r} refused: only http(s) is followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"{name!r} resolves outside {folder}")
    return path


def is_valid_image(path: Path) -> bool:
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "not a usable image"
        return False


class HostGate:
    """At most `per_host` requests in flight per host, and at least `min_interval` seconds between starts."""

    def __init__(self, per_host: int, min_interval: float) -> None:
        self.per_host = per_host
        self.min_interval = min_interval
        self._slots: dict[str, threading.Semaphore] = defaultdict(lambda: threading.Semaphore(per_host))
        self._last: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def __call__(self, host: str) -> threading.Semaphore:
        with self._lock:
            slot = self._slots[host]
        return slot

    def wait_turn(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._last[host] + self.min_interval)
            self._last[host] = start
        if start > now:
            time.sleep(start - now)


class Downloader:
    def __init__(self, folder: Path, *, timeout_s: float = 10.0, retries: int = 3, max_bytes: int = 20_000_000,
                 workers: int = 8, per_host: int = 4, min_interval: float = 0.0, backoff_s: float = 0.5,
                 deadline_s: float = 60.0) -> None:
        self.folder = folder
        self.timeout_s = timeout_s
        # timeout_s bounds each wait for bytes; a server that sends one byte a second never trips it, so every
        # attempt also has a deadline for the whole file.
        self.deadline_s = deadline_s
        self.retries = retries
        self.max_bytes = max_bytes
        self.workers = workers
        self.backoff_s = backoff_s
        self.gate = HostGate(per_host, min_interval)
        folder.mkdir(parents=True, exist_ok=True)

    def _get(self, url: str, target: Path) -> int:
        """Stream url into target (via a temp file). Returns bytes written; raises on any failure."""
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        tmp = target.with_name(f".{target.name}.part-{threading.get_ident()}")
        try:
            deadline = time.monotonic() + self.deadline_s
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise TooLarge(f"declared size {int(declared):,} bytes > cap {self.max_bytes:,}")
                written = 0
                with tmp.open("wb") as out:
                    # read1: what has arrived (read(n) would wait for all n bytes of a trickle).
                    while block := response.read1(1 << 16):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"timed out: the file took longer than {self.deadline_s:g} s "
                                               "(images.deadline_s)")
                        written += len(block)
                        if written > self.max_bytes:
                            raise TooLarge(f"body exceeds cap {self.max_bytes:,} bytes")
                        out.write(block)
                if declared is not None and declared.isdigit() and written < int(declared):
                    raise Truncated(f"got {written:,} of {int(declared):,} declared bytes")
            tmp.replace(target)
            return written
        finally:
            tmp.unlink(missing_ok=True)

    def fetch(self, sample_id: object, url: str | None) -> FetchOutcome:
        if not url:
            return FetchOutcome(sample_id, url, None, "invalid_url", None, None, "no image link")
        name = download_filename(url)
        if name is None:
            return FetchOutcome(sample_id, url, None, "invalid_url", None, None, "expected an http(s) URL to a file")
        try:
            target = inside(self.folder, name)
        except ValueError as exc:
            return FetchOutcome(sample_id, url, None, "invalid_url", None, None, str(exc))
        if target.is_file() and is_valid_image(target):
            return FetchOutcome(sample_id, url, str(target), "cached", target.stat().st_size, file_sha256(target), None)
        host = urlparse(url).netloc
        last_error, status = "", "error"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self.gate(host):
                    self.gate.wait_turn(host)
                    size = self._get(url, target)
            except TooLarge as exc:
                return FetchOutcome(sample_id, url, None, "too_large", None, None, str(exc))
            except RefusedRedirect as exc:
                return FetchOutcome(sample_id, url, None, "invalid_url", None, None, str(exc))
            except urllib.error.HTTPError as exc:
                status, last_error = "http_error", f"HTTP {exc.code}"
                if exc.code not in RETRYABLE_STATUS:
                    break
                continue
            except (TimeoutError, urllib.error.URLError, Truncated, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                timed_out = isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError) or "timed out" in str(exc)
                status = "timeout" if timed_out else "error"
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if not is_valid_image(target):
                target.unlink(missing_ok=True)
                return FetchOutcome(sample_id, url, None, "not_image", size, None, "downloaded bytes do not decode")
            return FetchOutcome(sample_id, url, str(target), "ok", size, file_sha256(target), None)
        return FetchOutcome(sample_id, url, None, status, None, None, last_error)

    def fetch_all(self, rows: Iterable[tuple[object, str | None]], progress: bool = True) -> list[FetchOutcome]:
        rows = list(rows)
        outcomes: list[FetchOutcome] = []
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self.fetch, sid, url) for sid, url in rows]
            for future in tqdm(as_completed(futures), total=len(futures), desc="images", disable=not progress):
                outcomes.append(future.result())
        return outcomes


class TooLarge(Exception):
    pass


class Truncated(Exception):
    pass


def resolve_local(folder: Path, sample_id: object, url: str | None) -> FetchOutcome:
    """Point at a pre-downloaded folder of images named by URL basename (no network)."""
    name = safe_filename(url) if url else None
    if name is None:
        return FetchOutcome(sample_id, url, None, "invalid_url", None, None, "expected an http(s) URL to a file")
    try:
        path = inside(folder, name)
    except ValueError as exc:
        return FetchOutcome(sample_id, url, None, "invalid_url", None, None, str(exc))
    if not path.is_file():
        return FetchOutcome(sample_id, url, None, "missing", None, None, f"{name} not in {folder}")
    return FetchOutcome(sample_id, url, str(path), "local", path.stat().st_size, file_sha256(path), None)
