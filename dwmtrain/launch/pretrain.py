"""DeepSpeed entry point for pretraining with a DWM (every rank runs this).

    deepspeed --num_gpus N --module dwmtrain.launch.pretrain --config tiny --run-dir runs/x [k=v ...]
    deepspeed --hostfile hosts --module dwmtrain.launch.pretrain --config FILE --run-dir DIR [k=v ...]

``--config`` takes a YAML file or the name of a bundled config (tiny, small, paper_370m, ...).
Running the same command again resumes from the newest complete checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from dwmtrain.config import build_deepspeed_config, load_config
from dwmtrain.entry import main_entry, run_main
from dwmtrain.errors import EXIT_OK
from dwmtrain.preflight import check_inputs
from dwmtrain.train.stop import catch_stop_signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="dwmtrain.launch.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="YAML run config, or a bundled config's name (see `dwmtrain configs`)")
    ap.add_argument("--run-dir", help="output directory (sets run.run_dir)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return ap.parse_args(argv)


def dry_run(cfg) -> None:
    """Everything checked first (inputs, batch arithmetic for this world size), then printed, with the planner's
    verdict. On a login node without the GPUs, DWMTRAIN_GPU=h100 (h200, a100, a memory size) plans for them and
    WORLD_SIZE / LOCAL_WORLD_SIZE give the ranks."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    acc = "cuda" if os.environ.get("DWMTRAIN_GPU") else "cpu"
    try:
        from deepspeed.accelerator import get_accelerator

        acc = "cuda" if os.environ.get("DWMTRAIN_GPU") else get_accelerator().device_name()
    except ImportError:
        pass
    check_inputs(cfg)
    ds = build_deepspeed_config(cfg, world, acc)
    print(cfg.to_yaml(), end="")
    print(f"# generated DeepSpeed config (world size {world}, accelerator {acc}):")
    print(json.dumps(ds, indent=2))
    try:
        print("# " + plan_verdict(cfg, world, acc))
    except Exception as e:  # noqa: BLE001 - the plan is advice: a dry run that passed its checks still passes
        print(f"# plan: unavailable ({type(e).__name__}: {e}); try `dwmtrain plan`")


def plan_verdict(cfg, world: int, accelerator: str) -> str:
    """The planner's one line for this world size, on this machine's devices (dwmtrain plan has the table)."""
    from dwmtrain.plan import make_plan, parse_device, verdict

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpu = os.environ.get("DWMTRAIN_GPU") or ("cpu" if accelerator == "cpu" else _device_kind())
    p = make_plan(cfg, max(world // max(local, 1), 1), local, parse_device(gpu, local))
    return verdict(p) + ("" if p.fits else "; `dwmtrain plan` says what to change")


def _device_kind() -> str:
    """This machine's GPU as the planner names it (h100, h200, a100), else its memory in GiB."""
    import torch

    name = torch.cuda.get_device_name().lower()
    for kind in ("h200", "h100", "a100"):
        if kind in name:
            return kind
    return f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}GiB"


def main(argv: list[str] | None = None) -> int:
    catch_stop_signal()  # a SIGUSR1 while torch and DeepSpeed load: remembered, the first step stops the run
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    a = parse_args(argv)
    return run_main("[dwmtrain]", lambda: _pretrain(a))


def _pretrain(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, list(a.overrides) + ([f"run.run_dir={a.run_dir}"] if a.run_dir else []))
    if a.dry_run:
        dry_run(cfg)
        return EXIT_OK
    check_inputs(cfg)  # before any process group or GPU is touched
    from dwmtrain.rendezvous import rendezvous_env
    from dwmtrain.train.main import run_training

    os.environ.update(rendezvous_env(os.environ))  # ranks started by mpirun / srun
    run_training(cfg)
    return EXIT_OK


if __name__ == "__main__":
    main_entry(main)
