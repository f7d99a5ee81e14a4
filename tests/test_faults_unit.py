"""The fault points' parsing and actions, and which failures count as a lost peer: pure functions, no processes
but one child that a fault point stops."""

import os
import signal
import socket
import subprocess
import sys
import time

from dwmtrain import faults
from dwmtrain.distributed import is_peer_failure, peer_lost
from tests.helpers import REPO


def with_spec(monkeypatch, spec: str) -> None:
    monkeypatch.setattr(faults, "_FAULTS", faults.parse(spec))
    monkeypatch.setattr(faults, "_ACTED", set())


def test_conditions_ranges_lists_and_several_faults(monkeypatch):
    with_spec(monkeypatch, "step:rank=1:step=3-5,9:action=stop;nonfinite-loss:rank=0:step=2")
    assert faults.fault_active("step", rank=1, step=4) and faults.fault_active("step", rank=1, step=9)
    assert not faults.fault_active("step", rank=1, step=6) and not faults.fault_active("step", rank=0, step=4)
    assert faults.fault_active("nonfinite-loss", rank=0, step=2) and not faults.fault_active(
        "nonfinite-loss", rank=1, step=2
    )
    assert faults._matching("step", {"rank": 1, "step": 3}) == (0, "stop")  # action is not a condition
    assert faults._matching("nonfinite-loss", {"rank": 0, "step": 2}) == (1, "kill")
    with_spec(monkeypatch, "")
    assert not faults.fault_active("step", rank=1, step=4)


def test_a_stop_fault_stops_its_process_once():
    code = ("from dwmtrain.faults import fault_point\n"
            "for s in (1, 2, 2, 3):\n    fault_point('step', rank=0, step=s)\nprint('done', flush=True)\n")  # fmt: skip
    env = dict(os.environ, DWMTRAIN_FAULT="step:rank=0:step=2:action=stop", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 60:
        state = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
        assert p.poll() is None, "ended without stopping"
        time.sleep(0.02)
    assert state == "T"
    os.kill(p.pid, signal.SIGCONT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out.strip() == "done"  # step 2's second visit did not stop it again


def test_which_failures_are_a_lost_peer():
    gloo = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv operation"
    assert is_peer_failure(RuntimeError(gloo))
    assert is_peer_failure(RuntimeError("Connection closed by peer [127.0.0.1]:40869"))
    assert not is_peer_failure(RuntimeError("Tensors must be contiguous"))
    assert not is_peer_failure(ValueError("timed out"))
    assert peer_lost(RuntimeError("Tensors must be contiguous"), 8) is None  # not distributed, not a peer failure


def test_a_silent_rank_whose_process_exited_here_is_not_waited_for():
    from dwmtrain.distributed.peers import _exited_here
    from dwmtrain.procs import stat_fields

    here = socket.gethostname()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not _exited_here(f"{here}, pid {p.pid}")  # alive: the roll call waits its window
        fields = stat_fields(p.pid)  # /proc/PID/stat after the name: the state, then the parent
        assert fields[0] in "RSD" and fields[1] == str(os.getpid())
        p.kill()
        t0 = time.time()
        while not _exited_here(f"{here}, pid {p.pid}") and time.time() - t0 < 30:  # a zombie until reaped
            time.sleep(0.05)
        assert _exited_here(f"{here}, pid {p.pid}")
    finally:
        p.wait()
    assert _exited_here(f"{here}, pid {p.pid}")  # reaped: no such process
    assert not _exited_here(f"another-host, pid {p.pid}") and not _exited_here("")  # elsewhere or unnamed: wait


def test_a_time_limit_signal_during_the_start_is_remembered_not_fatal():
    code = ("import os, signal\nfrom dwmtrain.train.stop import StopRequest, catch_stop_signal\n"
            "if os.environ['EARLY'] == '1':\n    catch_stop_signal()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "print('requested', StopRequest().requested, flush=True)\n")  # fmt: skip

    def run(early: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, EARLY=early, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)

    caught, bare = run("1"), run("0")
    assert caught.returncode == 0 and caught.stdout.strip() == "requested True", caught.stderr
    assert bare.returncode == -signal.SIGUSR1  # without it, SIGUSR1's default action ends the process
