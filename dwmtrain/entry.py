"""How every dwmtrain process ends: one wrapper turns an entry point's outcome into its exit code, and one exit
ends the process so that nothing can change that code afterwards.

Outcomes and codes (``dwmtrain.errors``): done 0; the project's own error 2 (one line naming what to fix); a planned
stop its own code (3 at a stage boundary with ``meta.launch=external``, 4 on SIGUSR1 with a complete checkpoint),
said once by rank 0; a lost peer 2 (the roll call names the rank); anything else is a bug: its traceback, 1.

Why the process ends with ``os._exit``: after ``destroy_process_group`` a rank still has live native threads (gloo's
pair loops and worker threads of the groups DeepSpeed's engine and optimizer still hold, and on rank 0 the
rendezvous store's server thread; ``docs/design.md``, "How a process ends"). The interpreter's exit destroys
them in an order no one controls, and now and then a thread object is destroyed while still joinable: the C++
runtime aborts ("terminate called without an active exception", SIGABRT: exit -6, or 250 through a launcher)
after the rank's work is on disk and its message printed. ``exit_process`` runs Python's own exit handlers
(temporary directories, logging, file locks), flushes, and ends without any native destructor.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

from dwmtrain.errors import EXIT_ERROR, EXIT_OK, DWMTrainError, PlannedStop

EXIT_BUG = 1  #: an unexpected exception (its traceback is printed): a bug to report
#: Python's exit handlers get this long; a handler that hangs must not keep a finished job from ending
EXIT_HANDLERS_S = 60.0


def run_main(prefix: str, body: Callable[[], int | None]) -> int:
    """Run an entry point's ``body`` and return the process's exit code (see the module docstring).

    ``prefix`` starts every line said here (``[dwmtrain]``, ``meta_update:``, ``dwmtrain report:``). Inside a
    process group, a rank that finished or stopped as planned leaves the group with every other rank first; a
    rank that failed leaves without waiting for anyone."""
    code, together = _outcome(prefix, body)
    if together:
        try:
            _leave_group()
        except Exception as e:  # noqa: BLE001 - a peer lost at the last barrier
            return _failed(prefix, e)
    return code


def _outcome(prefix: str, body: Callable[[], int | None]) -> tuple[int, bool]:
    """(exit code, whether every rank ends the same way and leaves the group together)."""
    try:
        code = body()
        return (EXIT_OK if code is None else code), True
    except PlannedStop as e:  # a decision every rank shares: said once
        if _rank() == 0:
            sys.stderr.write(f"{prefix} {e}\n")
        return e.exit_code, True
    except DWMTrainError as e:
        say_error(prefix, e)
        return EXIT_ERROR, False
    except SystemExit as e:  # argparse's usage errors (2), or a body that exits on purpose
        return _exit_code(e), False
    except KeyboardInterrupt:
        return 130, False
    except Exception as e:  # noqa: BLE001 - a failed collective is a lost peer; anything else is a bug
        return _failed(prefix, e), False


def _failed(prefix: str, e: Exception) -> int:
    """A lost peer (named by the roll call, said by one rank): 2; anything else is a bug: its traceback, 1."""
    lost = _peer_lost(e)
    if lost is None:
        traceback.print_exception(e)
        return EXIT_BUG
    if not lost.quiet:
        say_error(prefix, lost)
    return EXIT_ERROR


def say_error(prefix: str, e: DWMTrainError) -> None:
    """The project's error as its one line (and its hint's line): ``PREFIX error (Type): message``."""
    hint = f"\n{prefix} {e.hint}" if e.hint else ""
    sys.stderr.write(f"{prefix} error ({type(e).__name__}): {e}{hint}\n")
    sys.stderr.flush()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: Python's exit handlers run (bounded by ``EXIT_HANDLERS_S``), the standard
    streams are flushed, and ``os._exit`` ends it without the interpreter's native teardown. Every dwmtrain
    process ends here."""
    done = threading.Event()

    def bound() -> None:
        if not done.wait(EXIT_HANDLERS_S):
            sys.stderr.write(f"[dwmtrain] exit handlers still running after {EXIT_HANDLERS_S:.0f} s; exiting\n")
            _flush()
            os._exit(code)

    threading.Thread(target=bound, name="exit-bound", daemon=True).start()
    try:
        atexit._run_exitfuncs()  # each handler's own error is printed by atexit and does not stop the others
        _finalize_mpi()
    finally:
        done.set()
        _flush()
        os._exit(code)


def _finalize_mpi() -> None:
    """A process that initialized MPI (mpi4py, imported under mpirun) finalizes it: mpi4py does so in the
    interpreter's own teardown, which ``os._exit`` skips, and mpirun reports a rank that exits without it as
    failed (exit 1 instead of the rank's code). Bounded like the exit handlers: a peer that is gone cannot hold
    the exit."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def main_entry(main: Callable[[], int | None]) -> NoReturn:
    """``if __name__ == "__main__": main_entry(main)``: the process ends with ``main()``'s code (argparse's usage
    error included), through ``exit_process``."""
    try:
        code = main()
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - a bug outside run_main: its traceback, and still one way out
        traceback.print_exc()
        code = EXIT_BUG
    exit_process(EXIT_OK if code is None else code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass


def _exit_code(e: SystemExit) -> int:
    """What ``sys.exit(x)`` means: an int is the code, None 0, anything else is printed and means 1."""
    if e.code is None or isinstance(e.code, int):
        return e.code or EXIT_OK
    print(e.code, file=sys.stderr)
    return EXIT_BUG


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def _dist():
    """``torch.distributed`` if this process joined a group (torch is not imported just to learn it did not)."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _leave_group() -> None:
    """Every rank at the barrier, then the group destroyed: no rank leaves while another still exchanges with
    it (which fails that rank's collective)."""
    if (dist := _dist()) is not None:
        dist.barrier()
        dist.destroy_process_group()


def _peer_lost(e: BaseException):
    """The roll call's verdict on a failed collective (``distributed.peer_lost``), or None if ``e`` is not one."""
    if _dist() is None:
        return None
    from dwmtrain.distributed import peer_lost

    return peer_lost(e)
