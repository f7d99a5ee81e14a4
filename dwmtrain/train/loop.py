"""The training loop: get batch, weigh, forward, backward, step, log, maybe checkpoint, maybe boundary."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dwmtrain.data.dataset import rank_micro_batches
from dwmtrain.distributed import all_reduce_
from dwmtrain.models.dwm import weight_stats
from dwmtrain.stages.schedule import stage_of
from dwmtrain.train.evaluate import evaluate
from dwmtrain.train.loss import per_sample_loss, weighted_loss
from dwmtrain.train.metrics import mfu, peak_flops
from dwmtrain.train.setup import Run


@torch.no_grad()
def weigh(dwm, x: torch.Tensor) -> torch.Tensor:
    """Weights [B] (mean 1) from the frozen DWM, or uniform."""
    return torch.ones(x.shape[0], device=x.device) if dwm is None else dwm(x).float()


def train(run: Run) -> None:
    cfg, d, eng, plan = run.cfg, run.d, run.engine, run.plan
    total, step, tag = cfg.stages.total_steps, run.start_step, run.start_tag
    batches = rank_micro_batches(run.order, step * plan.global_batch_size, d.rank, d.world, plan.micro_batch_size)
    dwm, dwm_info, dwm_stage = None, {}, None
    peak = peak_flops(torch.cuda.get_device_name() if d.accelerator == "cuda" else "")
    bar = tqdm(total=total, initial=step, disable=not d.is_main, unit="step", dynamic_ncols=True, mininterval=2)
    while step < total:
        stage = stage_of(step, run.starts)
        if stage != dwm_stage:  # stage boundary (or start): meta-update / broadcast as configured
            dwm, dwm_info = run.handoff.for_stage(stage, tag, cfg.meta.lookahead_lr or eng.get_lr()[0])
            dwm_stage = stage
        t0, lr = time.time(), eng.get_lr()[0]  # the lr this step uses (the scheduler steps inside eng.step)
        acc = torch.zeros(5, dtype=torch.float64)  # sum w*L, sum L, entropy, ess, micro-batches
        lo, hi = torch.tensor([float("inf")]), torch.tensor([-float("inf")])
        for _ in range(plan.gradient_accumulation_steps):
            _, idx = next(batches)
            x = run.data.batch(idx).to(d.device)
            w = weigh(dwm, x)
            losses = per_sample_loss(eng(input_ids=x).logits, x)
            eng.backward(weighted_loss(losses, w))
            eng.step()
            s = weight_stats(w)
            acc += torch.tensor(
                [(w * losses).mean().item(), losses.mean().item(), s["entropy"], s["ess"], 1.0],
                dtype=torch.float64,
            )
            lo, hi = torch.minimum(lo, torch.tensor([s["min"]])), torch.maximum(hi, torch.tensor([s["max"]]))
        step += 1
        all_reduce_(acc), all_reduce_(lo, "min"), all_reduce_(hi, "max")
        dt = time.time() - t0
        tps = plan.tokens_per_step / dt
        n = acc[4].item()
        rec = {
            "step": step,
            "stage": stage,
            "loss": acc[0].item() / n,
            "loss_unweighted": acc[1].item() / n,
            "lr": lr,
            "tokens_per_s": tps,
            "samples_seen": step * plan.global_batch_size,
            "dwm": dwm_info.get("version", "uniform"),
            "w_entropy": acc[2].item() / n,
            "w_ess": acc[3].item() / n,
            "w_min": lo.item(),
            "w_max": hi.item(),
            "step_time_s": dt,
        }
        if (u := mfu(tps, run.n_params, d.world, peak)) is not None:
            rec["mfu"] = u
        if step % cfg.run.log_every == 0 or step == total:
            run.metrics.log(rec)
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{rec['loss']:.3f}", tok_s=f"{tps:.0f}", refresh=False)
        boundary = step in run.starts[1:]
        if boundary or step == total or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
            ev = evaluate(
                lambda b: eng(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                run.val,
                cfg.run.eval_batches,
                plan.micro_batch_size,
                d.rank,
                d.world,
                d.device,
            )
            run.metrics.log({"step": step, "stage": stage, **ev, "dwm": rec["dwm"]}, kind="eval")
            eng.train()
        if boundary or step == total or step % cfg.run.checkpoint_every == 0:
            tag = run.ckpt.save(
                eng,
                {
                    "step": step,
                    "stage": stage,
                    "stage_boundary": boundary,
                    "consumed_samples": step * plan.global_batch_size,
                    "dwm": dwm_info,
                    "config_sha256": cfg.hash(),
                    "compat": run.compat,
                },
            )
    bar.close()
    run.metrics.close()
