"""What several test files need, written once: the repository root, a free port, polling, processes from /proc."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Ask ``pred()`` every ``interval_s`` until it is true or ``timeout_s`` have passed (then once more): whether
    it became true. An exception in ``pred`` (a failed assert: the awaited thing can no longer happen) propagates."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval_s)
    return bool(pred())


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie no one reaps has exited)."""
    try:
        state = _stat(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def ppid(pid: int) -> int:
    """The parent of ``pid``."""
    return int(_stat(pid)[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop(0))
        todo += children.get(out[-1], [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, by process id (the tree is listed before anything is killed)."""
    for q in process_tree(pid):
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
