"""Getting one file onto local disk, from HTTP or a folder, without ever leaving a bad copy.

Notable:
- Bytes go to `<name>.part` beside the target. The final name appears only after
  the file is complete (size == Content-Length) and `verify` accepted it, by an
  atomic rename: a killed run leaves a `.part`, never a truncated final file.
- A `.part` left by an earlier attempt (or an earlier run) is resumed with an HTTP
  Range request. A server that answers 200 instead of 206 restarts it from zero.
- Retries with exponential backoff and jitter on connection errors, timeouts, 429
  (Retry-After honoured) and 5xx. 404 and the other 4xx fail at once, naming the
  URL; so does a full disk. A file that downloads completely but fails `verify`
  is fetched once more from scratch, then reported as corrupt at the source.
- `Accept-Encoding: identity`: sizes and Range offsets refer to the file's bytes,
  not a compressed transfer encoding.
- Progress: bytes, files done, rate and ETA as a tqdm bar when stderr is a
  terminal, a log line every PROGRESS_EVERY_S otherwise (CI, DVC, Dagster).
- One requests.Session per thread (connection reuse without sharing a Session).
- `locked(dest)`: an exclusive lock file that keeps two processes (say, two
  orchestrator partitions) from filling the same `.part` at once; the second
  waits, then finds the file done.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
import urllib3

from nanoforge.common import get_logger

try:  # POSIX; elsewhere we simply don't lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

BACKOFF_BASE_S = 1.0  # first retry waits ~1 s, then 2, 4, ... (tests make this tiny)
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 300.0  # a server asking for more than 5 minutes gets 5 minutes
CHUNK = 1 << 20
PROGRESS_EVERY_S = 10.0  # log-line cadence when stderr is not a terminal
VERIFY_REFETCHES = 1  # a complete-but-invalid file is downloaded once more before we blame the source

log = get_logger("download")
_local = threading.local()

# progress(key, bytes of this file on disk so far, its full size or None)
ProgressFn = Callable[[str, int, "int | None"], None]


class FetchError(RuntimeError):
    """A file that cannot be fetched: the message names the URL (or path) and why."""


class DiskFullError(FetchError):
    """No space left for a download."""


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


@dataclass
class FetchResult:
    bytes: int  # size of the final file
    transferred: int  # bytes received in this call (resumed bytes are not counted)
    attempts: int  # requests made, retries included
    resumed_from: int  # size of the .part this call found (0: started from nothing)
    seconds: float
    verified: Any  # what `verify` returned


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def free_bytes(directory: str | Path) -> int:
    return shutil.disk_usage(directory).free


def backoff_delay(retry: int, base: float | None = None) -> float:
    """Exponential backoff with jitter: base * 2^retry, capped, times 0.5..1.5."""
    base = BACKOFF_BASE_S if base is None else base
    return min(BACKOFF_CAP_S, base * (2 ** retry)) * (0.5 + random.random())


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date. None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), RETRY_AFTER_CAP_S)


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.headers.update({"Accept-Encoding": "identity", "User-Agent": "nanoforge-download"})
    return session


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _disk_full(path: Path, need: int | None = None) -> DiskFullError:
    free = free_bytes(path.parent)
    what = f"{need / 1e6:.1f} MB needed, " if need else ""
    return DiskFullError(
        f"disk full writing {path} ({what}{free / 1e6:.1f} MB free on that disk); "
        "free some space (or point the repo's data/ at a bigger disk) and re-run: finished files are kept"
    )


class locked:
    """`with locked(dest):` an exclusive advisory lock on <dest>.lock while one process works on dest.

    Callers re-check `dest` inside the lock: whoever held it before may have finished it.
    """

    def __init__(self, dest: str | Path):
        dest = Path(dest)
        self.path = dest.with_name(dest.name + ".lock")
        self._fd: int | None = None

    def __enter__(self):
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder before us unlinks the file on release: make sure ours is the live one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self._fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc):
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it, so no lock file outlives its user
            os.close(self._fd)
            self._fd = None


def is_locked(dest: str | Path) -> bool:
    """True if some process holds `locked(dest)` right now."""
    dest = Path(dest)
    lock = dest.with_name(dest.name + ".lock")
    if fcntl is None or not lock.exists():
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def fetch(
    source: str,
    dest: str | Path,
    *,
    verify: Callable[[Path], Any] | None = None,
    timeout: float = 30.0,
    max_retries: int = 5,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    base_delay: float | None = None,
) -> FetchResult:
    """Put `source` (an http(s) URL or a local file) at `dest`, verified, or raise FetchError.

    `verify(path)` gets the complete temporary file and raises if it is bad; what it
    returns comes back as `FetchResult.verified`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    if is_url(source):
        return _fetch_http(source, dest, part, verify, timeout, max_retries, progress, stop, base_delay)
    return _copy_local(Path(source), dest, part, verify, progress, stop)


def _finish(source: str, part: Path, dest: Path, verify, refetches: list[int]) -> tuple[bool, Any]:
    """Verify the complete .part and rename it into place. (False, None) means: fetch it again."""
    try:
        verified = verify(part) if verify else None
    except Exception as exc:
        part.unlink(missing_ok=True)
        if refetches[0] < VERIFY_REFETCHES:
            refetches[0] += 1
            log.warning("%s: downloaded file failed verification (%s); fetching it again from scratch", source, exc)
            return False, None
        raise FetchError(f"{source}: the file is invalid even when fetched again: {exc}") from None
    os.replace(part, dest)
    return True, verified


def _fetch_http(url, dest, part, verify, timeout, max_retries, progress, stop, base_delay) -> FetchResult:
    start = time.monotonic()
    resumed_from = part.stat().st_size if part.exists() else 0
    transferred = [0]
    attempts = retries = 0
    refetches = [0]
    while True:
        if stop is not None and stop.is_set():
            raise FetchError(f"{url}: interrupted (the partial file {part} is kept for the next run)")
        attempts += 1
        try:
            size = _attempt(url, part, timeout, progress, stop, transferred, dest.name)
        except _Retry as r:
            if retries >= max_retries:
                raise FetchError(
                    f"{url}: giving up after {attempts} attempts (last: {r.reason}); "
                    f"raise download.max_retries or try again later"
                ) from None
            delay = r.delay if r.delay is not None else backoff_delay(retries, base_delay)
            retries += 1
            log.warning("%s: %s; retry %d/%d in %.1fs", url, r.reason, retries, max_retries, delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            continue
        done, verified = _finish(url, part, dest, verify, refetches)
        if done:
            return FetchResult(size, transferred[0], attempts, resumed_from, time.monotonic() - start, verified)


def _attempt(url: str, part: Path, timeout: float, progress, stop, transferred: list[int], key: str) -> int:
    """One request: fill `part` to its full size (returned), or raise _Retry / FetchError."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = _session().get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.RequestException as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from None
    with resp:
        status = resp.status_code
        if status == 416 and offset:
            _, total = _content_range(resp.headers.get("Content-Range"))
            if total == offset:  # an earlier run got every byte but did not get to rename
                return offset
            part.unlink(missing_ok=True)
            raise _Retry(f"server rejected resuming at byte {offset} (HTTP 416); starting over", delay=0)
        if status == 429:
            raise _Retry("HTTP 429 Too Many Requests", delay=retry_after_seconds(resp.headers.get("Retry-After")))
        if status >= 500:
            raise _Retry(f"HTTP {status} {resp.reason}", delay=retry_after_seconds(resp.headers.get("Retry-After")))
        if status == 404:
            raise FetchError(f"{url}: HTTP 404 Not Found; check the URL (download.dataset / base_url / eval_bundle_url, HF_ENDPOINT, NANOFORGE_MIRROR)")
        if status >= 400 or status not in (200, 206):
            raise FetchError(f"{url}: HTTP {status} {resp.reason}")
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {first}, not {offset}; starting over", delay=0)
            mode = "ab"
        else:
            if offset:
                log.info("%s: server does not resume (HTTP 200 to a Range request); starting over", url)
            offset, mode, total = 0, "wb", length
        if total is not None and total - offset > free_bytes(part.parent):
            raise _disk_full(part, total - offset)
        size = offset
        if progress is not None:
            progress(key, size, total)
        try:
            with open(part, mode) as f:
                # read1, not iter_content: it hands over whatever arrived, so when the
                # connection drops mid-body every received byte is on disk for the resume
                while chunk := resp.raw.read1(CHUNK, decode_content=False):
                    if stop is not None and stop.is_set():
                        raise FetchError(f"{url}: interrupted (the partial file {part} is kept for the next run)")
                    f.write(chunk)
                    size += len(chunk)
                    transferred[0] += len(chunk)
                    if progress is not None:
                        progress(key, size, total)
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
            # before OSError: RequestException subclasses it
            raise _Retry(f"connection broken after {size} bytes ({type(exc).__name__})") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(part, (total - size) if total else None) from None
            raise
    if total is not None and size != total:
        if size > total:
            part.unlink(missing_ok=True)
        raise _Retry(f"body ended at {size} of {total} bytes")
    return size


def _copy_local(src: Path, dest: Path, part: Path, verify, progress, stop) -> FetchResult:
    start = time.monotonic()
    if not src.is_file():
        raise FetchError(f"{src}: no such file")
    total = src.stat().st_size
    if total > free_bytes(part.parent):
        raise _disk_full(part, total)
    refetches = [0]
    while True:
        size = 0
        try:
            with open(src, "rb") as fin, open(part, "wb") as fout:
                while block := fin.read(CHUNK):
                    if stop is not None and stop.is_set():
                        part.unlink(missing_ok=True)
                        raise FetchError(f"{src}: interrupted")
                    fout.write(block)
                    size += len(block)
                    if progress is not None:
                        progress(dest.name, size, total)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise _disk_full(part, total) from None
            raise FetchError(f"copying {src} to {dest}: {exc}") from None
        done, verified = _finish(str(src), part, dest, verify, refetches)
        if done:
            return FetchResult(size, size, 1, 0, time.monotonic() - start, verified)


def _unresolvable(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror) or type(exc).__name__ == "NameResolutionError":
            return True
        # requests wraps urllib3's MaxRetryError, whose .reason is the resolver's error
        reason = getattr(exc, "reason", None)
        first = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        exc = reason if isinstance(reason, BaseException) else (exc.__cause__ or exc.__context__ or first)
    return False


def probe(url: str, timeout: float = 30.0) -> int | None:
    """HEAD `url`: its size in bytes, or None when the server won't say. FetchError on 404 / 4xx.

    Used before any download starts, so a wrong URL or a full disk fails fast.
    Transient trouble (timeouts, 5xx, 429, HEAD not allowed) returns None: the
    download itself retries.
    """
    try:
        resp = _session().head(url, allow_redirects=True, timeout=(timeout, timeout))
    except requests.RequestException as exc:
        if _unresolvable(exc):  # no DNS answer at all: offline, or a typo; retrying for a minute helps neither
            host = urlsplit(url).hostname
            raise FetchError(
                f"{url}: cannot resolve host {host!r} (offline, or a wrong URL). To download from a local "
                "mirror instead, set NANOFORGE_MIRROR to its URL or folder (python -m bench.mirror build), "
                "or set download.source_dir / HF_ENDPOINT"
            ) from None
        log.debug("HEAD %s failed (%s); size unknown", url, exc)
        return None
    with resp:
        if resp.status_code == 404:
            raise FetchError(f"{url}: HTTP 404 Not Found; check the URL (download.dataset / base_url / eval_bundle_url, HF_ENDPOINT, NANOFORGE_MIRROR)")
        if resp.status_code in (401, 403, 410):
            raise FetchError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code != 200:
            return None
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None


# ---------------------------------------------------------------------------
# progress: a bar on a terminal, log lines elsewhere (CI, DVC, Dagster)

class Progress:
    """Bytes, files done, rate and ETA. Thread-safe: workers call update()/finished()."""

    def __init__(self, label: str, files: int, sizes: dict[str, int | None], tty: bool | None = None,
                 every_s: float | None = None):
        from tqdm import tqdm

        self.label, self.files, self.done = label, files, 0
        self.sizes = dict(sizes)
        self.have: dict[str, int] = {}
        self.transferred = 0
        self.start = self._last = time.monotonic()
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self._lock = threading.Lock()
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(total=self._total(), unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                        desc=self._desc()) if tty and files else None

    def _total(self) -> int | None:
        known = [s for s in self.sizes.values() if s]
        if not known:
            return None
        return int(sum(known) * len(self.sizes) / len(known))  # unknown sizes: assume the average

    def _desc(self) -> str:
        return f"{self.label} {self.done}/{self.files}"

    def update(self, name: str, have: int, total: int | None) -> None:
        with self._lock:
            prev = self.have.get(name)
            self.have[name] = have
            if total and not self.sizes.get(name):
                self.sizes[name] = total
                if self.bar is not None:
                    self.bar.total = self._total()
            if prev is None:  # the first report is where this file starts (a resumed .part)
                if self.bar is not None:
                    self.bar.update(have)
                return
            self.transferred += max(0, have - prev)
            if self.bar is not None:
                self.bar.update(have - prev)
            elif time.monotonic() - self._last >= self.every_s:
                self._last = time.monotonic()
                log.info("%s", self.line())

    def finished(self, name: str) -> None:
        with self._lock:
            self.done += 1
            if self.bar is not None:
                self.bar.set_description(self._desc())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.transferred / elapsed
        have, total = sum(self.have.values()), self._total()
        eta = f", ETA {_clock((total - have) / rate)}" if total and rate > 0 else ""
        size = f"{have / 1e6:,.1f}/{total / 1e6:,.1f} MB" if total else f"{have / 1e6:,.1f} MB"
        return f"{self._desc()} files, {size}, {rate / 1e6:.1f} MB/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def show_progress(label: str, files: int, sizes: dict[str, int | None]):
    progress = Progress(label, files, sizes)
    redirect = contextlib.nullcontext()
    if progress.bar is not None:  # log lines go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm(loggers=[log])
    try:
        with redirect:
            yield progress
    finally:
        progress.close()
