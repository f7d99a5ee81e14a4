"""Entry point of the training job (called by dwmtrain.launch.pretrain on every rank)."""

from __future__ import annotations

import sys

from dwmtrain.config import Config


def run_training(cfg: Config) -> int:
    """Set up, train, and turn expected failures (the project's own errors) into one message and exit 2."""
    from dwmtrain.errors import DWMTrainError
    from dwmtrain.stages.handoff import ExternalMetaRequired
    from dwmtrain.train.loop import train
    from dwmtrain.train.setup import setup
    from dwmtrain.train.stop import EXIT_CODE as STOP_EXIT_CODE
    from dwmtrain.train.stop import StoppedForTimeLimit

    try:
        train(setup(cfg))
        _teardown(clean=True)
    except ExternalMetaRequired as e:  # a decision every rank shares: said once, by rank 0
        _say_once(f"[dwmtrain] stopped at a stage boundary: {e}")
        _teardown(clean=True)  # every rank stops here: leave together (CI saw rank 0 abort at exit once)
        return 3
    except StoppedForTimeLimit as e:
        _say_once(f"[dwmtrain] {e}; rerun (or requeue) the same command to resume")
        _teardown(clean=True)
        return STOP_EXIT_CODE
    except DWMTrainError as e:
        print(f"[dwmtrain] error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
        if e.hint:
            print(f"[dwmtrain] {e.hint}", file=sys.stderr, flush=True)
        return 2
    finally:
        _teardown(clean=False)
    return 0


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
