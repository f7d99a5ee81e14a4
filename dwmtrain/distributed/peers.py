"""The roll call: after a failed collective, the ranks that still answer name the ones that do not (their host
and pid, recorded in the rendezvous store when they joined)."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import torch.distributed as dist

from dwmtrain.distributed.group import TIMING
from dwmtrain.errors import DWMTrainError
from dwmtrain.procs import alive


class PeerLost(DWMTrainError):
    """A collective failed: a rank died, or stopped answering for longer than ``run.dist_timeout_s``."""

    hint = "rerun the same command: it resumes from the newest complete checkpoint"

    def __init__(self, message: str = "", quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet  #: another rank says it: this one leaves without a word


_ROLL = "dwmtrain/peers"  # store keys: each rank's host and pid (at init), then who answered the roll call


#: what gloo, NCCL and the store say when a peer is gone or silent (a collective's own errors say otherwise)
_COMM_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
                  "connection refused", "nccl error", "ncclremoteerror", "socket")  # fmt: skip


def _store_set(key: str, value: str) -> None:
    try:
        dist.distributed_c10d._get_default_store().set(key, value)
    except Exception:  # noqa: BLE001 - the names are a courtesy for a later message; never fail the start
        pass


def _store_get(store, key: str) -> str:
    """The value of ``key``, or "" when no rank recorded it (the rank number alone is then named). A store that
    does not answer raises (its host, rank 0, is stopped): a get would wait its timeout, and once timed out the
    client can wait on for good (``peer_lost`` bounds the whole roll call)."""
    return store.get(key).decode() if store.check([key]) else ""


def _exited_here(name: str) -> bool:
    """Whether ``name`` (``"HOST, pid N"``) is a process on this host that has exited (gone, or a zombie its
    launcher has not reaped): a rank killed next to us need not be waited for."""
    host, _, pid = name.partition(", pid ")
    if host != socket.gethostname() or not pid.isdigit() or not os.path.isdir("/proc"):
        return False
    return not alive(int(pid))  # gone, or a zombie


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a communication failure (a peer died or went silent), not an error of the collective's
    own arguments."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())) or isinstance(e, TimeoutError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COMM_FAILURES)


def peer_lost(e: BaseException, timeout_s: float | None = None, window_s: float | None = None) -> PeerLost | None:
    """After a failed collective: a roll call over the rendezvous store names the ranks that do not answer within
    ``window_s`` (default ``min(timeout_s, 20)``: the live ranks all time out within about that of each other),
    with their hosts and pids. Returns the error, ``quiet`` on every rank but the lowest that answered, or
    ``None`` when ``e`` is not a communication failure (the caller re-raises it). Rank 0 hosts the store: if it
    does not answer (an error, or no end of the roll call 10 s after its window: a client of a stopped store can
    wait on past its own timeout), each node's first rank (and rank 1) says so."""
    if not dist.is_initialized() or not is_peer_failure(e):
        return None
    rank = dist.get_rank()
    timeout_s = TIMING.timeout_s if timeout_s is None else timeout_s  # the group's own (init_distributed)
    window_s = min(timeout_s, 20.0) if window_s is None else window_s
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]  # gloo's "[.../unbound_buffer.cc:78] " source location
    said = f"a collective on rank {rank} failed ({first}; run.dist_timeout_s={timeout_s:g})"
    box: list = []

    def call() -> None:
        try:
            box.append(_roll_call(rank, dist.get_world_size(), window_s, said))
        except Exception:  # noqa: BLE001 - the store is rank 0's: it is gone or stopped too
            pass

    caller = threading.Thread(target=call, name="roll-call", daemon=True)  # the caller leaves at once after
    caller.start()
    caller.join(window_s + 10)  # the roll call's own wait is the window; a live store answers at once
    if box:
        return box[0]
    quiet = int(os.environ.get("LOCAL_RANK", "0")) != 0 and rank != 1  # each node's first rank, and rank 1
    return PeerLost(f"rank 0 (which hosts the rendezvous store) stopped answering: {said}", quiet=quiet)


def _roll_call(rank: int, world: int, window_s: float, said: str) -> PeerLost:
    """Answer the roll call and wait until every rank has, the window closes, or every silent rank is a process
    on this host that has exited; the lowest rank that answered names the silent ones."""
    from datetime import timedelta

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=max(window_s, 1.0)))
    store.set(f"{_ROLL}/here/{rank}", "1")
    names = {r: _store_get(store, f"{_ROLL}/host/{r}") for r in range(world)}
    deadline = time.monotonic() + window_s
    while True:
        here = [r for r in range(world) if store.check([f"{_ROLL}/here/{r}"])]
        gone = [r for r in range(world) if r not in here]
        exited = all(_exited_here(names[r]) for r in gone)
        if not gone or time.monotonic() > deadline or exited:
            break
        time.sleep(0.25)
    if rank != min(here):
        return PeerLost(quiet=True)
    if not gone:
        return PeerLost(f"{said}; every rank answered the roll call afterwards")
    named = ", ".join(f"rank {r} ({names[r]})" if names[r] else f"rank {r}" for r in gone)
    return PeerLost(f"{named} {'exited' if exited else 'stopped answering'}: {said}")


def record_host(rank: int) -> None:
    """Put this rank's host and pid in the store: what the roll call names if it stops answering."""
    _store_set(f"{_ROLL}/host/{rank}", f"{socket.gethostname()}, pid {os.getpid()}")
