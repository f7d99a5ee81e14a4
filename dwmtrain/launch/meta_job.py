"""The meta-update job for one stage boundary (its entry point).

    torchrun --standalone --nproc_per_node N -m dwmtrain.launch.meta_job --run-dir DIR --stage K [--checkpoint TAG]
    srun --nodes M --ntasks-per-node N python -m dwmtrain.launch.meta_job --run-dir DIR --stage K [--checkpoint TAG]

Reads DIR/config.yaml (written by the training job), the ZeRO-3 checkpoint DIR/checkpoints/TAG, the
previous DWM (DIR/dwm/stage{K-1}.safetensors) if any, and writes DIR/dwm/stage{K}.safetensors plus
DIR/meta/stage{K}.jsonl. The training job starts this itself with meta.launch=local; with
meta.launch=external (e.g. a separate SLURM job) run it by hand, then rerun the training command.
Either way the same DWM comes out: alpha and the thread count are derived here, from the config.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from dwmtrain.config import load_config
from dwmtrain.errors import ConfigError
from dwmtrain.procs import exit_with_parent, process_started_at
from dwmtrain.rundir import RunDir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="dwmtrain.launch.meta_job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", type=int, required=True, help="the stage this DWM will weigh (2..T)")
    ap.add_argument("--checkpoint", default="", help="checkpoint tag at the start of that stage (default: latest)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of meta.* settings (the lookahead "
                    "alpha: meta.lookahead_lr=A)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dwmtrain.entry import run_main

    warnings.filterwarnings("ignore", category=FutureWarning)
    a = parse_args(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: end with torchrun, even if it is SIGKILLed
        exit_with_parent()
    return run_main("meta_update:", lambda: _meta_update(a))


def _meta_update(a: argparse.Namespace) -> None:
    rd = RunDir(a.run_dir)
    cfg = load_config(rd.config, [*a.overrides, f"run.run_dir={rd.root}"])
    if not a.checkpoint and not rd.latest.is_file():
        raise ConfigError(f"--run-dir {rd.root}: {rd.latest} not found (no complete checkpoint); pass --checkpoint TAG")
    tag = a.checkpoint or json.loads(rd.latest.read_text())["tag"]
    import torch

    from dwmtrain.distributed import cpu_threads, init_distributed
    from dwmtrain.distributed.rendezvous import rendezvous_env
    from dwmtrain.log import setup_logging
    from dwmtrain.meta.update import run_meta_update

    os.environ.update(rendezvous_env(os.environ))  # tasks of an srun step (torchrun set them already)
    setup_logging("[meta]", int(os.environ.get("RANK", "0")), cfg.run.log_level, cfg.run.log_all_ranks)
    d = init_distributed(cfg.run.dist_timeout_s)
    # full fp32 matmuls, never TF32: TF32's rounded inputs make dR/dw about 28x less accurate at the default
    # fd_eps (tools/bench.py metaacc, emulated; docs/scaling.md)
    torch.set_float32_matmul_precision("highest")
    if d.accelerator == "cpu":
        torch.set_num_threads(cpu_threads(cfg.run.threads_per_rank, d.local_world))
    run_meta_update(cfg, d, a.stage, tag, started_at=process_started_at())


if __name__ == "__main__":
    from dwmtrain.entry import main_entry

    main_entry(main)
