"""A run directory: its files, config.json, metrics.jsonl, what may start or continue there, and
the lock that keeps it to one process.

A new run needs an empty (or new) folder; ``--resume`` needs a vitlab run with a checkpoint
(``state.pt``). The process that trains holds an exclusive lock on ``RUN/.lock`` (``fcntl``; the
holder's pid is written in it) for the whole run, so a second ``train`` or ``--resume`` of the same
folder fails at once, naming the holder. Temporary files left by a killed write are removed when
the next process takes the lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from .checkpoint import atomic_write
from .trainconfig import TrainConfig, config_from_dict

LOCK_FILE = ".lock"
CONFIG_FILE, STATE_FILE, METRICS_FILE = "config.json", "state.pt", "metrics.jsonl"
LAST_FILE, BEST_FILE, CURVES_FILE = "last.safetensors", "best.safetensors", "curves.png"


def is_temporary(path: Path) -> bool:
    """A file left by a killed write (atomic_write's ``.NAME.*.tmp``, safetensors' ``.tmpXXXX``)."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith(".tmp"))


def _describe(run: Path) -> str:
    """What a folder holds, for error messages: ``config.json, metrics.jsonl (614 lines), ...``."""
    parts = []
    for f in sorted(p for p in run.iterdir() if p.name != LOCK_FILE):
        if f.name == METRICS_FILE:
            with open(f, "rb") as fh:
                parts.append(f"{f.name} ({sum(1 for _ in fh)} lines)")
        else:
            parts.append(f.name + ("/" if f.is_dir() else ""))
    return ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "")


def check_run_dir(run: Path, *, resume: bool) -> None:
    """Refuse what would lose or mix up a run: a foreign or occupied folder for a new run, a folder
    without a checkpoint for ``--resume``."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run} is a file, not a folder; pass a new folder name")
    holds = run.is_dir() and any(p.name != LOCK_FILE and not is_temporary(p) for p in run.iterdir())
    if resume:
        if not (run / CONFIG_FILE).is_file():
            raise ValueError(f"{run} is not a vitlab run (no {CONFIG_FILE}); nothing to resume")
        if not (run / STATE_FILE).is_file():
            raise ValueError(f"{run} has no {STATE_FILE} to resume from (it holds {_describe(run)}); resuming "
                             f"would start over and overwrite that history: start a new run with another --out")
    elif holds:
        if (run / CONFIG_FILE).is_file() or (run / STATE_FILE).is_file():
            raise ValueError(f"{run} already holds a run; continue it with `vitlab train --resume {run}` "
                             f"or pass another --out")
        raise ValueError(f"{run} is not empty and is not a vitlab run (it holds {_describe(run)}); pass a new or "
                         f"empty folder as --out")


def data_fingerprint(root: Path) -> dict[str, object]:
    """What the training data is, cheaply: every file under ``root`` (relative path, size, mtime), hashed."""
    h, n = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
            n += 1
    return {"sha256": h.hexdigest(), "files": n}


def check_same_data(run: Path, recorded: dict[str, object] | None, now: dict[str, object], *, allow: bool,
                    log) -> None:
    """Refuse to resume on data that changed since the run started, unless ``allow``."""
    if recorded is None:
        log(f"{run} recorded no data fingerprint (an older run); the data cannot be checked")
    elif recorded["sha256"] != now["sha256"]:
        change = f"{recorded['files']} files then, {now['files']} now" if recorded["files"] != now["files"] else \
            "the same number of files, but names, sizes or modification times differ"
        if not allow:
            raise ValueError(f"the training data changed since {run} started ({change}); resuming would not be "
                             f"exact. Point --data at the original data, or pass --allow-data-change to go on")
        log(f"the training data changed since {run} started ({change}); going on (--allow-data-change)")


class RunLock:
    """An exclusive lock on a run directory for as long as the ``with`` block runs (``fcntl.flock``);
    ``again`` is the command that continues it, for the message a second process gets."""

    def __init__(self, run: Path, *, again: str = "") -> None:
        self.run, self.again = run, again or f"vitlab train --resume {run}"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"{self.run} is in use by process {holder}; wait for it to finish (or stop it), "
                             f"then `{self.again}`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for tmp in filter(is_temporary, self.run.iterdir()):
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The resolved config of the run in ``run_dir`` (its ``config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} does not exist")
    try:
        return config_from_dict(json.loads(path.read_text())["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a vitlab run config ({err!r}); is it corrupted?") from err


class MetricsLog:
    """``metrics.jsonl``, one JSON record per line; resuming first drops records after the resumed step."""

    def __init__(self, path: Path, *, keep_until: int) -> None:
        kept = [r for r in read_metrics(path) if r["step"] <= keep_until] if path.exists() else []
        write_json_lines(path, kept)
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
