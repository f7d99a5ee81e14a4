"""Entry point of the training job (called by dwmtrain.launch.pretrain on every rank)."""

from __future__ import annotations

import sys

from dwmtrain.config import Config
from dwmtrain.errors import EXIT_ERROR, EXIT_OK, DWMTrainError, PlannedStop


def run_training(cfg: Config) -> int:
    """Set up, train, and turn planned stops and expected failures (the project's own errors) into their exit
    codes: 3 or 4 with one message from rank 0, 2 with one line naming what to fix."""
    from dwmtrain.train.loop import train
    from dwmtrain.train.setup import setup

    try:
        train(setup(cfg))
        _teardown(clean=True)
    except PlannedStop as e:  # a decision every rank shares: said once, by rank 0
        _say_once(f"[dwmtrain] {e}")
        _teardown(clean=True)  # every rank stops here: leave together (CI saw rank 0 abort at exit once)
        return e.exit_code
    except DWMTrainError as e:
        print(f"[dwmtrain] error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
        if e.hint:
            print(f"[dwmtrain] {e.hint}", file=sys.stderr, flush=True)
        _exit_now_if_distributed(EXIT_ERROR)
        return EXIT_ERROR
    except Exception as e:  # a collective failed: name the rank that died or stopped answering
        from dwmtrain.distributed import leave_if_peer_lost

        leave_if_peer_lost(e, cfg.run.dist_timeout_s, "[dwmtrain]")
        raise
    finally:
        _teardown(clean=False)
    return EXIT_OK


def _exit_now_if_distributed(code: int) -> None:
    """A rank leaving on an error, perhaps alone, with gloo's threads alive: it leaves the group and ends at once,
    without the interpreter's exit-time destructors, where such a rank sometimes aborted ("terminate called without
    an active exception", exit 250 instead of 2: seen in CI). Its outputs are flushed first."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    _teardown(clean=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say_once(message: str) -> None:
    """Rank 0 writes a message all ranks share, in one write so no other output splits its lines."""
    import os

    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def _teardown(clean: bool) -> None:
    """Leave the process group explicitly: a rank exiting with gloo threads alive can abort at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
