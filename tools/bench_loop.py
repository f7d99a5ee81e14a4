#!/usr/bin/env python3
"""dwmtrain's training step against the bare loop a user would write instead, both launched the same way in one run.

    python tools/bench.py loop [--steps 40 --reps 2]       # the benchmark (tools/bench.py runs both loops)
    deepspeed --num_gpus 2 tools/bench_loop.py --bare ...  # one bare-loop job, as the benchmark launches it

dwmtrain: ``dwmtrain.launch.pretrain --config small`` with ``meta.mode=none`` (uniform weights: the step's own
cost, no DWM), its defaults otherwise (a record of every step in metrics.jsonl and TensorBoard, the per-step
agreement, the chunked loss head). The bare loop: Hugging Face's ``LlamaForCausalLM`` of the same shape built under
``deepspeed.zero.Init``, ``deepspeed.initialize`` on the same generated DeepSpeed JSON, Hugging Face's own loss, the
same data order and micro-batches, the loss read once per step (a user's log line). Both on 2 CPU ranks with the
same threads and allocator setting; each loop's time per optimizer step is the median over its steps after a
warm-up, whole iterations (everything the loop does between two steps). Jobs alternate, so a drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 5  #: steps left out of the median (start-up, allocator warm-up)


def overrides(data: str, steps: int) -> list[str]:
    """The run both loops take: the small config on ``data`` (at its sequence length), uniform, one stage, no save
    or validation before the last step."""
    seq_len = json.loads((Path(data) / "index.json").read_text())["seq_len"]
    return [f"data.train_data={data}", f"data.seq_len={seq_len}", "meta.mode=none", f"stages.total_steps={steps}",
            "stages.num_stages=1", f"run.checkpoint_every={steps}", "run.eval_every=0",
            "run.threads_per_rank=1"]  # fmt: skip


def bare_loop(a) -> None:
    """One rank of the bare loop: its per-step seconds to ``a.out`` (rank 0)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dwmtrain.config import batch_plan, build_deepspeed_config, load_config
    from dwmtrain.data.dataset import GlobalOrder, TokenDataset, rank_micro_batches
    from dwmtrain.distributed import skip_cpu_inference_op
    from dwmtrain.models.spec import lm_spec

    skip_cpu_inference_op()  # the machine's safety, not the loop's speed: only DeepSpeed's inference calls it
    deepspeed.init_distributed()
    torch.set_num_threads(1)
    cfg = load_config("small", overrides(a.data, a.steps))
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = build_deepspeed_config(cfg, world, "cpu")
    plan = batch_plan(cfg, world)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AutoModelForCausalLM.from_config(lm_spec(cfg.model).hf_config("sdpa"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    data = TokenDataset(Path(a.data), "train")
    batches = rank_micro_batches(GlobalOrder(len(data), cfg.run.seed), 0, rank, world, plan.micro_batch_size)
    times, t = [], time.perf_counter()
    for _ in range(a.steps):
        for _ in range(plan.gradient_accumulation_steps):
            x = data.batch(next(batches)[1])
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        loss.item()  # the user's log line
        now = time.perf_counter()
        times.append(now - t)
        t = now
    if rank == 0:
        Path(a.out).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def _launch(cmd: list[str], log: Path) -> None:
    from dwmtrain.distributed.rendezvous import free_port
    from dwmtrain.launch.cli import CPU_MALLOC_ENV

    env = {**os.environ, **CPU_MALLOC_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    full = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *cmd]
    with open(log, "w") as f:
        rc = subprocess.run(full, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"bench loop: {' '.join(cmd[:3])} exited {rc}; see {log}")


def dwmtrain_steps(data: str, steps: int, work: Path, rep: int, extra: tuple[str, ...] = ()) -> list[float]:
    """Per-step seconds of dwmtrain's loop (with ``extra`` overrides): differences of consecutive records' times in
    metrics.jsonl."""
    run = work / f"dwm{rep}{'-'.join(extra)}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (an old one would resume, and train nothing)
    _launch(["--module", "dwmtrain.launch.pretrain", "--config", "small", "--run-dir", str(run),
             *overrides(data, steps), *extra], work / f"{run.name}.log")  # fmt: skip
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in sorted(recs, key=lambda r: r["step"])]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bare_steps(data: str, steps: int, work: Path, rep: int) -> list[float]:
    out = work / f"bare{rep}.json"
    _launch([str(Path(__file__)), "--bare", "--data", data, "--steps", str(steps), "--out", str(out)],
            work / f"bare{rep}.log")  # fmt: skip
    return json.loads(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    bare_loop(ap.parse_args(argv))


if __name__ == "__main__":
    main()
