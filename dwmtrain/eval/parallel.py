"""The evaluations ``dwmtrain eval`` has to run, on every device given: one lm-eval process per device (a GPU
each: ``CUDA_VISIBLE_DEVICES`` set before CUDA starts), each taking the next job from one queue. A job is one
checkpoint's shot settings (exported once), or one setting alone when that keeps more devices busy. Each result
is cached as it comes (``runs.evaluate_checkpoint``), so a failed evaluation loses only itself."""

from __future__ import annotations

import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

_DEVICE = "cpu"  # this worker process's device


def split_jobs(jobs: list, devices: int) -> list:
    """Jobs as given, or one per (checkpoint, shot setting) when there are fewer checkpoints than devices."""
    if len(jobs) >= devices:
        return jobs
    return [(r, run, ck, {k: v}) for r, run, ck, todo in jobs for k, v in todo.items()]


def run_jobs(evaluate, jobs: list, devices: list[str], lm_eval: dict, log) -> list:
    """[(run index, {(stage, shots): result})] of every job, in the jobs' order: ``evaluate(run dir, checkpoint,
    todo, lm-eval options, log)`` (``runs.evaluate_checkpoint``) on the devices."""
    from dwmtrain.rundir import RunDir

    if len(devices) <= 1 or len(jobs) == 0:
        dev = devices[0] if devices else "cpu"
        return [(r, evaluate(RunDir(run), ck, todo, dict(lm_eval, device=dev), log)) for r, run, ck, todo in jobs]
    jobs = split_jobs(jobs, len(devices))
    workers = min(len(devices), len(jobs))
    log(f"[dwmtrain eval] {len(jobs)} evaluations on {workers} devices: {', '.join(devices[:workers])}")
    import multiprocessing as mp

    from dwmtrain.procs import usable_cpus

    ctx = mp.get_context("spawn")  # CUDA (and lm-eval's threads) must start in each worker, not be forked
    queue = ctx.Queue()
    for d in devices[:workers]:
        queue.put(d)
    threads = max(1, usable_cpus() // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, threads)) as pool:
        futures = [pool.submit(_job, evaluate, run, ck, todo, lm_eval) for _, run, ck, todo in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for g in futures:
                    g.cancel()
                raise f.exception()
        return [(r, f.result()) for (r, *_), f in zip(jobs, futures)]


def _init_worker(queue, threads: int) -> None:
    """Take one device; a GPU becomes this process's only visible one (before torch starts CUDA)."""
    global _DEVICE
    dev = queue.get()
    if dev.startswith("cuda"):
        k = int(dev.split(":")[1]) if ":" in dev else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[k] if visible else str(k)
        _DEVICE = "cuda"
    else:
        import torch

        torch.set_num_threads(threads)
        _DEVICE = dev


def _job(evaluate, run: str, ck, todo: dict, lm_eval: dict) -> dict:
    from dwmtrain.rundir import RunDir

    where = f"gpu {os.environ['CUDA_VISIBLE_DEVICES']}" if _DEVICE == "cuda" else f"{_DEVICE} pid {os.getpid()}"
    return evaluate(RunDir(run), ck, todo, dict(lm_eval, device=_DEVICE), lambda m: _say(f"[{where}] {m}"))


def _say(line: str) -> None:
    """One line in one write: the workers share the parent's stdout, and a line that print() hands over in two
    pieces (what a library left in the buffer, then the rest) can be cut by another worker's line."""
    import sys

    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())
