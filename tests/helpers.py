"""What several test files need, written once: the repository root, a free port, polling, processes from /proc."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from dwmtrain.distributed.rendezvous import free_port  # noqa: F401 - the tests' free port, the package's
from dwmtrain.procs import alive, stat_fields  # noqa: F401 - alive: the tests' liveness check, the package's

REPO = Path(__file__).resolve().parents[1]


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


def ppid(pid: int) -> int:
    """The parent of ``pid``."""
    return int(_stat(pid)[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        if fields := stat_fields(proc.name):  # None: the process ended while we looked
            children.setdefault(int(fields[1]), []).append(int(proc.name))
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


def wandb_offline_runs(root: Path, wait_s: float = 30.0) -> list[tuple[str, list]]:
    """(run id, records) of every offline W&B run under ``root``/wandb, oldest first: the records of its
    ``run-ID.wandb`` log (W&B's LevelDB-style log of protobuf ``Record``s: 32 KiB blocks of chunks, each a CRC,
    a 2-byte length and a type: full, first, middle, last), read without a network or a W&B account. W&B's own
    process writes the log: read again (for at most ``wait_s``) until every run's log ends with its exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = _read_wandb_logs(root)
        done = all(any(r.WhichOneof("record_type") == "exit" for r in recs) for _, recs in runs)
        if done or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _read_wandb_logs(root: Path) -> list[tuple[str, list]]:
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb")):
        raw, pos, part, records = f.read_bytes(), 7, b"", []
        assert raw[:4] == b":W&B", f
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            n, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
            data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # full, last
                rec = pb.Record()
                rec.ParseFromString(part + data)
                records.append(rec)
                part = b""
            elif kind in (2, 3):  # first, middle
                part += data
        out.append((f.stem.removeprefix("run-"), records))
    return out


def wandb_history(records: list) -> list[dict]:
    """The logged rows of one offline W&B run: {key: value}."""
    import json

    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def stage_boundary(cfg, rd, expect_sha=None, tokenizer_sha: str = "", starts=(0, 10, 20, 30, 40), arch=None,
                   data=None, dtype=None):  # fmt: skip
    """A ``StageBoundary`` of one CPU rank (stage K starts at step 10 (K - 1)), for the boundary's unit tests."""
    import torch

    from dwmtrain.distributed import Dist
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.stages.boundary import BoundaryInputs, StageBoundary

    d = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")
    return StageBoundary(
        BoundaryInputs(
            cfg=cfg,
            d=d,
            rd=rd,
            arch=arch or DWMArch("tiny", 512, 32),
            dtype=dtype or torch.float32,
            starts=list(starts),
            tokenizer_sha=tokenizer_sha,
            data=data,
            expect_sha=expect_sha or {},
        )
    )
