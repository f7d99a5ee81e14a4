"""How a process ends (dwmtrain.entry): each outcome's exit code and words, in process; the one exit, in child
processes (Python's exit handlers run, bounded; the code is the one asked for, whatever native threads live)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dwmtrain.entry import EXIT_BUG, run_main
from dwmtrain.errors import EXIT_ERROR, EXIT_META_EXTERNAL, EXIT_OK, ConfigError, PlannedStop

from .helpers import REPO


class Boundary(PlannedStop):
    exit_code = EXIT_META_EXTERNAL


def raising(e: BaseException):
    def body():
        raise e

    return body


@pytest.mark.parametrize(
    "body, code, said",
    [
        (lambda: None, EXIT_OK, ""),
        (lambda: 7, 7, ""),
        (raising(Boundary("stopped at a stage boundary")), EXIT_META_EXTERNAL, "[x] stopped at a stage boundary\n"),
        (
            raising(ConfigError("data.seq_len=0: must be > 0")),
            EXIT_ERROR,
            "[x] error (ConfigError): data.seq_len=0: must be > 0\n",
        ),  # fmt: skip
        (raising(SystemExit(2)), 2, ""),
        (raising(SystemExit(None)), EXIT_OK, ""),
        (raising(SystemExit("usage: no")), EXIT_BUG, "usage: no\n"),
    ],
)
def test_each_outcome_has_its_code_and_its_one_line(body, code, said, capsys):
    assert run_main("[x]", body) == code
    assert capsys.readouterr().err == said


def test_an_error_with_a_hint_says_it_on_a_second_line(capsys):
    class Stale(ConfigError):
        hint = "rerun the same command"

    assert run_main("meta_update:", raising(Stale("a"))) == EXIT_ERROR
    assert capsys.readouterr().err == "meta_update: error (Stale): a\nmeta_update: rerun the same command\n"


def test_a_bug_keeps_its_traceback_and_exits_1(capsys):
    assert run_main("[x]", raising(KeyError("surprise"))) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'surprise'" in err


def test_a_planned_stop_is_said_by_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert run_main("[x]", raising(Boundary("stop"))) == EXIT_META_EXTERNAL
    assert capsys.readouterr().err == ""


def child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_one_exit_runs_python_exit_handlers_then_ends_with_the_code(tmp_path):
    p = child(f"""
        import atexit, threading, time
        from dwmtrain.entry import main_entry
        atexit.register(lambda: open({str(tmp_path / "handler-ran")!r}, "w").write("yes"))
        threading.Thread(target=time.sleep, args=(600,)).start()  # a thread that never ends: no wait for it
        print("work done")
        main_entry(lambda: 3)
    """)
    assert p.returncode == 3 and p.stdout == "work done\n", p.stderr
    assert (tmp_path / "handler-ran").read_text() == "yes"


def test_an_exit_handler_that_hangs_is_bounded(tmp_path):
    p = child("""
        import atexit, time
        import dwmtrain.entry as entry
        entry.EXIT_HANDLERS_S = 1.0
        atexit.register(time.sleep, 600)
        entry.main_entry(lambda: 4)
    """)
    assert p.returncode == 4 and "exit handlers still running after 1 s" in p.stderr


def test_argparse_usage_errors_keep_their_code_through_the_exit():
    p = child("""
        import argparse
        from dwmtrain.entry import main_entry
        main_entry(lambda: argparse.ArgumentParser(prog="t").parse_args(["--nope"]))
    """)
    assert p.returncode == 2 and "unrecognized arguments: --nope" in p.stderr
