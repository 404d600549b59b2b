"""One writer at a time per output folder: a lock file naming its holder (pid, host, start time).

Two processes writing into the same folder would overwrite each other's files (a training's checkpoints, a
merge's model), and both would say "done". Every command that writes takes ``OUT/train.lock`` for as long as
it runs (``cli/common.out_dir``), and so does the Trainer, the library's training loop. The file is created
with O_EXCL (atomic on local and NFSv3+ file systems), so of two racing processes exactly one wins. A lock
whose process is gone (same host, pid no longer running: a SIGKILL, a power cut) is stale and is taken over
with a note; a lock from another host cannot be checked from here, so it is reported and left to the user.
The lock names the command holding it (``sample``, or any writing command). Within one process a lock is
re-entrant: the command holds its folder, the Trainer it calls takes the same
lock again, and the file goes when the outermost holder releases it. A folder the lock had to create is
removed again on release if nothing was written into it (a refused command leaves no empty folder).

A pid alone is not an identity: after a reboot, or on a busy machine, the dead holder's pid can belong to
another, unrelated process, and the folder would look "in use" forever. Where Linux tells us (/proc), the
lock also records the kernel's boot id and the holder's start time (field 22 of /proc/PID/stat, clock ticks
since boot); a lock whose boot id or start time no longer match that pid's is stale too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from lora4diffusion.errors import UserError

log = logging.getLogger("lora4diffusion")
LOCK_NAME = "train.lock"
_HELD: dict[Path, RunLock] = {}  # lock file (resolved) -> the outermost RunLock of this process holding it
_UNREADABLE_GRACE_S = 30.0  # a lock file with no JSON yet may be one being written right now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def process_identity(pid: int) -> dict:
    """{"boot_id", "pid_start"} for a live ``pid`` where /proc has them (Linux), else {}."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the command name (field 2) may hold spaces and parentheses: count fields after its closing ')'
        start = int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return {}
    return {"boot_id": boot, "pid_start": start}


def _same_process(info: dict) -> bool:
    """Is the lock's pid, alive on this host, still the process that wrote the lock?"""
    if not _alive(info["pid"]):
        return False
    recorded = {k: info[k] for k in ("boot_id", "pid_start") if k in info}
    if not recorded:  # an older lock, or a system without /proc: the pid is all we have
        return True
    now = process_identity(info["pid"])
    return not now or all(now.get(k) == v for k, v in recorded.items())


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def held_here(directory: str | Path) -> bool:
    """Does this process hold ``directory``'s lock (a RunLock acquired and not yet released)?"""
    return (Path(directory) / LOCK_NAME).resolve() in _HELD


def holder(directory: str | Path) -> dict | None:
    """The live holder of ``directory``'s lock, or None when there is none, only a stale one, or this process
    holds it."""
    path = Path(directory) / LOCK_NAME
    if held_here(directory) or not path.is_file():
        return None
    info = _read(path)
    if info is None:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        return {"pid": "?", "host": "?", "started": "just now"} if age < _UNREADABLE_GRACE_S else None
    if info.get("host") == socket.gethostname() and not _same_process(info):
        return None
    return info


def describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def check_free(directory: str | Path) -> None:
    """Raise UserError naming the holder if a live training (or `sample`) holds ``directory``."""
    info = holder(directory)
    if info is not None:
        path = Path(directory) / LOCK_NAME
        what = info.get("command") if isinstance(info.get("command"), str) else "lora4diffusion process"
        raise UserError(
            f"{directory} is in use by another {what[:40]} ({describe(info)}) writing there;"
            f" wait for it to end, or delete {path} if that process is gone"
        )


class RunLock:
    """``with RunLock(dir):`` or acquire()/release(); release removes the file only while it is still ours,
    and the folder too where acquire created it and it is still empty."""

    def __init__(self, directory: str | Path, command: str = "training") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.created: list[Path] = []  # folders acquire made, outermost first
        self.nested = False  # another RunLock of this process holds the file: nothing to create or remove
        self.info = {
            "command": command,  # what the refusal of a second writer names
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **process_identity(os.getpid()),
        }
        self.held = False

    def acquire(self) -> None:
        if held_here(self.path.parent):
            self.held = self.nested = True
            return
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing[::-1]
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                old = _read(self.path)
                check_free(self.path.parent)  # raises while a live process holds it
                log.warning(
                    "%s: taking over a stale lock (%s, no longer running)",
                    self.path.parent,
                    describe(old) if old else "unreadable lock file",
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self.held = True
            _HELD[self.path.resolve()] = self
            return
        check_free(self.path.parent)
        raise UserError(f"{self.path}: could not take the lock (another process keeps recreating it)")

    def release(self) -> None:
        if self.held and not self.nested:
            _HELD.pop(self.path.resolve(), None)
            if _read(self.path) == self.info:
                self.path.unlink(missing_ok=True)
            for folder in reversed(self.created):  # innermost first; rmdir fails on a folder holding files
                try:
                    folder.rmdir()
                except OSError:
                    break
        self.held = self.nested = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
