"""DeepSpeed entry point for pretraining with a DWM (every rank runs this).

    deepspeed --num_gpus N --module dwmtrain.launch.pretrain --config tiny --run-dir runs/x [k=v ...]
    deepspeed --hostfile hosts --module dwmtrain.launch.pretrain --config FILE --run-dir DIR [k=v ...]

``--config`` takes a YAML file or the name of a bundled config (tiny, small, paper_370m, ...).
Running the same command again resumes from the newest complete checkpoint in DIR. ``--dry-run`` is one process
(``dwmtrain train ... --dry-run`` runs it without launching anything).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import dataclass

from dwmtrain.config import build_deepspeed_config, load_config
from dwmtrain.entry import main_entry, run_main
from dwmtrain.errors import EXIT_OK
from dwmtrain.log import setup_logging
from dwmtrain.preflight import check_inputs
from dwmtrain.train.stop import catch_stop_signal


@dataclass(frozen=True)
class Hardware:
    """What a dry run checks the config for: nodes x ranks per node of a device kind (``h100``, ``h200``, ``a100``,
    ``cpu``, a memory size; empty: this machine's), named by flags so a login node without the GPUs plans for them."""

    nodes: int = 1
    per_node: int = 1
    gpu: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def device(self) -> str:
        """The planner's name of the device: the flag's, else this machine's GPU, else ``cpu``."""
        if self.gpu:
            return self.gpu
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        name = torch.cuda.get_device_name().lower()
        kind = next((k for k in ("h200", "h100", "a100") if k in name), "")
        return kind or f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}GiB"


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options of a training run, shared by this entry point and ``dwmtrain train``."""
    ap.add_argument("--config", help="YAML run config, or a bundled config's name (see `dwmtrain configs`)")
    ap.add_argument("--run-dir", help="output directory (sets run.run_dir)")
    ap.add_argument("--dry-run", action="store_true", help="check every input, print the resolved config, the "
                    "DeepSpeed JSON and the planner's verdict for --nodes x --gpus-per-node --gpu, and exit (one "
                    "process, nothing launched)")  # fmt: skip
    ap.add_argument("--nodes", type=int, default=1, help="--dry-run: nodes the run will have")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="--dry-run: ranks per node (default: --nproc, or 1)")
    ap.add_argument("--gpu", default="", help="--dry-run: h100 | h200 | a100 | cpu | a memory size (80GiB); "
                    "default: this machine's")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (data.train_data=/data/x ...)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="dwmtrain.launch.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(ap)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_config(a: argparse.Namespace):
    """The run's config: ``--config``, the overrides (each must be ``key=value``), ``--run-dir``."""
    from dwmtrain.errors import ConfigError

    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]}: not an option of a training run nor a key=value override")
    return load_config(a.config, list(a.overrides) + ([f"run.run_dir={a.run_dir}"] if a.run_dir else []))


def dry_run(cfg, hw: Hardware) -> None:
    """Everything checked first (inputs, batch arithmetic for ``hw``'s world size), then printed, with the planner's
    verdict."""
    from dwmtrain.plan import first_fix, make_plan, parse_device, verdict

    check_inputs(cfg, deep=True)
    dev = parse_device(hw.device(), hw.per_node)
    ds = build_deepspeed_config(cfg, hw.world, dev.accelerator)
    print(cfg.to_yaml(), end="")
    print(f"# generated DeepSpeed config ({hw.nodes} x {hw.per_node} {dev.name}, world size {hw.world}):")
    print(json.dumps(ds, indent=2))
    p = make_plan(cfg, hw.nodes, hw.per_node, dev)
    if cfg.data.sources:  # what the run draws of each source: tokens, epochs, the step each starts to repeat
        from dwmtrain.data.mixture import open_training_data, source_plans
        from dwmtrain.models.spec import lm_spec

        data = open_training_data(cfg.data, lm_spec(cfg.model).vocab_size)
        for sp in source_plans(
            data, data.order(cfg.run.seed), cfg.stages.total_steps, p.tokens_per_step // cfg.data.seq_len
        ):
            print(f"# data.sources {sp.line(cfg.data.seq_len)}")
    fits = p.fits and not p.meta_over
    print("# " + verdict(p, None if fits else first_fix(cfg, hw.nodes, hw.per_node, dev)))


def main(argv: list[str] | None = None) -> int:
    catch_stop_signal()  # a SIGUSR1 while torch and DeepSpeed load: remembered, the first step stops the run
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    a = parse_args(argv)
    if a.dry_run and os.environ.get("RANK", "0") != "0":  # started by a launcher after all: rank 0 alone says it
        return EXIT_OK
    return run_main("[dwmtrain]", lambda: _pretrain(a))


def _pretrain(a: argparse.Namespace) -> int:
    cfg = run_config(a)
    if a.dry_run:
        dry_run(cfg, Hardware(a.nodes, a.gpus_per_node or 1, a.gpu))
        return EXIT_OK
    check_inputs(cfg)  # before any process group or GPU is touched
    from dwmtrain.distributed.rendezvous import rendezvous_env
    from dwmtrain.train.loop import train
    from dwmtrain.train.setup import setup

    os.environ.update(rendezvous_env(os.environ))  # ranks started by mpirun / srun
    setup_logging("[dwmtrain]", int(os.environ.get("RANK", "0")), cfg.run.log_level, cfg.run.log_all_ranks)
    train(setup(cfg))
    return EXIT_OK


if __name__ == "__main__":
    main_entry(main)
