"""The download cache: ``$VITLAB_HOME/hub`` (default ``~/.cache/vitlab/hub``).

A file is fetched into ``<file>.incomplete`` (resumed with an HTTP Range request after an
interruption), checked (the catalog's sha256; else the size and the server's ``x-goog-hash``
md5 / crc32c), then renamed into place next to a record ``<file>.json`` holding its sha256, which
every later load checks again. A lock file makes two processes fetching one file make one good
file. ``VITLAB_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from tqdm import tqdm

from ..checkpoint import write_json

GCS_URL = "https://storage.googleapis.com"
CHUNK = 1 << 20
RECORD_SUFFIX = ".json"
PARTIAL_SUFFIX = ".incomplete"


class OfflineError(ValueError):
    """The file is not cached and the network may not be used."""


def home() -> Path:
    """The cache root: ``$VITLAB_HOME/hub``, by default ``~/.cache/vitlab/hub``."""
    return Path(os.environ.get("VITLAB_HOME") or "~/.cache/vitlab").expanduser() / "hub"


def offline() -> bool:
    """True when ``VITLAB_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("VITLAB_OFFLINE", "HF_HUB_OFFLINE"))


def gcs_url(path: str) -> str:
    """The URL of a bucket path (``vit_models/...``) under ``$VITLAB_GCS_URL`` (default Google's)."""
    return f"{(os.environ.get('VITLAB_GCS_URL') or GCS_URL).rstrip('/')}/{path.lstrip('/')}"


def cache_path(kind: str, path: str) -> Path:
    """Where a file of a source kind (``gcs``, ``hf``) and relative path lives in the cache."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts or not parts:
        raise ValueError(f"{path!r} is not a relative path inside the cache")
    return home() / kind / Path(*parts)


def sha256_file(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file (``algorithm``: a hashlib name), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def read_record(path: Path) -> dict[str, Any] | None:
    """The record written beside a cached file, or None if there is none (or it is unreadable)."""
    try:
        return json.loads(path.with_name(path.name + RECORD_SUFFIX).read_text())
    except (OSError, ValueError):
        return None


def verify_cached(path: Path, sha256: str | None = None) -> None:
    """Check a cached file against its record (and the catalog's ``sha256``); ValueError if it fails.

    A file that fails is never used: it is left in place for the user to inspect, and the error
    says how to fetch it again.
    """
    record = read_record(path)
    if record is None:
        raise ValueError(f"cached file {path} has no record ({path.name}{RECORD_SUFFIX}); it did not enter the "
                         f"cache through vitlab: delete it and download again, or `vitlab hub import` it")
    actual = sha256_file(path)
    for expected, what in ((sha256, "the catalog's"), (record.get("sha256"), "the recorded")):
        if expected and actual != expected:
            raise ValueError(f"cached file {path} fails its check: sha256 {actual} is not {what} {expected}; "
                             f"delete it (`vitlab hub cache --prune`) and download again")


def _server_hashes(headers: Any) -> dict[str, str]:
    """``x-goog-hash: crc32c=..., md5=...`` -> {"md5": hex, "crc32c": base64} (GCS sends both, base64)."""
    out = {}
    for value in headers.get_all("x-goog-hash") or []:
        for part in value.split(","):
            algo, _, digest = part.strip().partition("=")
            if algo in ("md5", "crc32c") and digest:
                out[algo] = digest
    if "md5" in out:
        out["md5"] = base64.b64decode(out["md5"]).hex()
    return out


def _crc32c(path: Path) -> str | None:
    """The base64 big-endian crc32c of a file, when the ``google-crc32c`` package is installed."""
    try:
        import google_crc32c
    except ImportError:
        return None
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            c.update(chunk)
    return base64.b64encode(c.digest()).decode()


@dataclass
class _Response:
    total: int | None  # the whole file's size
    resumed: bool
    hashes: dict[str, str]


def _open(url: str, offset: int, timeout: float) -> tuple[Any, _Response]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    resp = urllib.request.urlopen(request, timeout=timeout)
    resumed = offset > 0 and resp.status == 206
    length = resp.headers.get("Content-Length")
    total = None
    if resumed and "/" in (resp.headers.get("Content-Range") or ""):
        total = int(resp.headers["Content-Range"].rsplit("/", 1)[1])
    elif length is not None:
        total = int(length) + (offset if resumed else 0)
    return resp, _Response(total, resumed, _server_hashes(resp.headers))


def fetch(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None, progress: bool = True,
          timeout: float = 60.0, name: str = "") -> Path:
    """``url`` into the cache at ``dest`` (locked, resumable, verified), or the cached file if it is good."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():
            verify_cached(dest, sha256)
            return dest
        if offline():
            raise OfflineError(offline_message(url, name))
        part = dest.with_name(dest.name + PARTIAL_SUFFIX)
        offset = part.stat().st_size if part.is_file() else 0
        try:
            resp, info = _open(url, offset, timeout)
            with resp, open(part, "ab" if info.resumed else "wb") as out:
                start = offset if info.resumed else 0
                with tqdm(total=info.total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=name or dest.name, disable=not progress, leave=False) as bar:
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as err:
            if err.code == 416:  # the partial file is not a prefix of what the server has now
                part.unlink(missing_ok=True)
            raise ValueError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise ValueError(f"download of {url} failed ({getattr(err, 'reason', err)}); run the command again "
                             f"to resume it, or fetch the file elsewhere and `vitlab hub import` it") from err
        _check_download(part, url, info, sha256, size)
        write_json(dest.with_name(dest.name + RECORD_SUFFIX),
                   {"url": url, "size": part.stat().st_size, "sha256": sha256_file(part),
                    "server_hashes": info.hashes, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.replace(part, dest)
    return dest


def _check_download(part: Path, url: str, info: _Response, sha256: str | None, size: int | None) -> None:
    """Reject (and delete) a transfer that is short, long or fails a hash; nothing enters the cache."""
    got = part.stat().st_size
    problems = []
    if info.total is not None and got < info.total:  # kept as .incomplete: the next call resumes it
        raise ValueError(f"download of {url} stopped after {got} of {info.total} bytes; run the command again to "
                         f"resume it")
    if info.total is not None and got != info.total:
        problems.append(f"{got} bytes where the server announced {info.total}")
    if size is not None and got != size:
        problems.append(f"{got} bytes where the catalog says {size}")
    if sha256 and (actual := sha256_file(part)) != sha256:
        problems.append(f"sha256 {actual}, the catalog's is {sha256}")
    if "md5" in info.hashes and (actual := sha256_file(part, "md5")) != info.hashes["md5"]:
        problems.append(f"md5 {actual}, the server's is {info.hashes['md5']}")
    if "crc32c" in info.hashes and (actual := _crc32c(part)) is not None and actual != info.hashes["crc32c"]:
        problems.append(f"crc32c {actual}, the server's is {info.hashes['crc32c']}")
    if problems:
        part.unlink(missing_ok=True)
        raise ValueError(f"download of {url} is corrupt ({'; '.join(problems)}); nothing was cached, try again")


def offline_message(url: str, name: str) -> str:
    """What to do when a file is needed offline: where to fetch it, and how to import it here."""
    target = name or "NAME"
    return (f"{target} is not in the cache ({home()}) and offline mode is on (VITLAB_OFFLINE / HF_HUB_OFFLINE); "
            f"fetch {url} on a connected machine, then `vitlab hub import FILE --name {target}`")


def import_into(src: Path, dest: Path, *, sha256: str | None = None, size: int | None = None) -> Path:
    """Copy a file carried by hand into the cache at ``dest``, checked like a download."""
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a file")
    got = src.stat().st_size
    if size is not None and got != size:
        raise ValueError(f"{src} has {got} bytes but the catalog says {size}; is it the right (complete) file?")
    digest = sha256_file(src)
    if sha256 and digest != sha256:
        raise ValueError(f"{src} has sha256 {digest} but the catalog says {sha256}; is it the right file?")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        part = dest.with_name(dest.name + PARTIAL_SUFFIX)
        shutil.copyfile(src, part)
        if sha256_file(part) != digest:
            part.unlink(missing_ok=True)
            raise ValueError(f"copying {src} into the cache changed it; check the disk and try again")
        write_json(dest.with_name(dest.name + RECORD_SUFFIX),
                   {"imported_from": str(src.resolve()), "size": got, "sha256": digest,
                    "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.replace(part, dest)
    return dest


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache, as ``hub cache`` lists it."""

    path: Path
    size: int
    state: str  # "ok" (has its record), "partial" (an interrupted download), "unrecorded"


def cached_files() -> list[CachedFile]:
    """Every file under the cache root with its state (records and locks are not listed)."""
    root = home()
    files = []
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if not p.is_file() or p.name.endswith((RECORD_SUFFIX, ".lock")):
            continue
        if p.name.endswith(PARTIAL_SUFFIX):
            state = "partial"
        else:
            state = "ok" if read_record(p) is not None else "unrecorded"
        files.append(CachedFile(p, p.stat().st_size, state))
    return files


def prune(*, everything: bool = False, match: str = "") -> list[Path]:
    """Delete partial and unrecorded files (``everything``: all files; ``match``: only paths containing it)."""
    removed = []
    for f in cached_files():
        if (everything or f.state != "ok") and match in str(f.path):
            with FileLock(str(f.path).removesuffix(PARTIAL_SUFFIX) + ".lock"):
                f.path.unlink(missing_ok=True)
                f.path.with_name(f.path.name + RECORD_SUFFIX).unlink(missing_ok=True)
            removed.append(f.path)
    return removed
