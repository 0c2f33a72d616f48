"""Download, verify and atomically extract the official CIFAR archives into a cache directory."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: where it is, its checksum, and the folder it extracts to."""

    url: str
    algorithm: str  # "md5" or "sha256" (hashlib names)
    digest: str
    folder: str


# The official archives. The CIFAR page (https://www.cs.toronto.edu/~kriz/cifar.html) lists
# only MD5 sums, so these are those official MD5s; no official SHA-256 is published.
CIFAR_ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                       "md5", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                        "md5", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),
}


def _fail(archive: Archive, what: str) -> ValueError:
    return ValueError(f"{what} for {archive.url}; download and extract it yourself and pass "
                      f"--data PATH (the folder {archive.folder}/), or retry later")


def _download(archive: Archive, dest: Path, timeout: float) -> None:
    """Stream ``archive.url`` to ``dest``; ValueError on no network or a short transfer."""
    try:
        with urllib.request.urlopen(archive.url, timeout=timeout) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(archive.url).name,
                      leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise _fail(archive, f"download failed ({getattr(err, 'reason', err)})") from err
    if total is not None and received != total:
        raise _fail(archive, f"truncated transfer ({received} of {total} bytes)")


def _check_digest(archive: Archive, path: Path) -> None:
    h = hashlib.new(archive.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != archive.digest.lower():
        raise _fail(archive, f"{archive.algorithm} mismatch (got {h.hexdigest()}, expected "
                             f"{archive.digest}): the download is corrupt")


def ensure_archive(name: str, cache_dir: str | os.PathLike, *,
                   archives: Mapping[str, Archive] = CIFAR_ARCHIVES, timeout: float = 10.0,
                   log: Callable[[str], None] = print) -> Path:
    """The extracted folder of archive ``name`` in ``cache_dir``, downloading it if absent."""
    if name not in archives:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(archives)}")
    archive = archives[name]
    cache = Path(cache_dir).expanduser()
    target = cache / archive.folder
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {archive.url} into {cache}")
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        tarball = work / "archive.tar.gz"
        _download(archive, tarball, timeout)
        _check_digest(archive, tarball)
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(work / "x", filter="data")  # refuses absolute paths, links out
        except (tarfile.TarError, OSError) as err:
            raise _fail(archive, f"cannot extract the archive ({err})") from err
        if not (work / "x" / archive.folder).is_dir():
            raise _fail(archive, f"the archive has no folder {archive.folder}/")
        try:
            os.replace(work / "x" / archive.folder, target)  # atomic: the folder appears whole
        except OSError:
            if not target.is_dir():  # else another process (rank) finished first: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
