"""The training loop: stage boundary, micro-batches (weigh, forward, backward, step), the step's agreement, log,
validate, checkpoint, planned stop."""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from dwmtrain.config.stages import stage_of
from dwmtrain.data.dataset import rank_micro_batches
from dwmtrain.data.validation import validation_metrics
from dwmtrain.distributed import all_gather_rows
from dwmtrain.faults import fault_active, fault_point
from dwmtrain.models.loss import weighted_objective
from dwmtrain.models.weights import weight_stats_tensor
from dwmtrain.stages.weighting import Weighting
from dwmtrain.train.metrics import mfu
from dwmtrain.train.setup import Run
from dwmtrain.train.stop import StoppedForTimeLimit

log = logging.getLogger(__name__)


def train(run: Run) -> None:
    """Train from ``run.start_step`` to the last step; the progress bar and the metrics close however it ends."""
    bar = tqdm(total=run.cfg.stages.total_steps, initial=run.start_step, disable=not run.d.is_main, unit="step",
               dynamic_ncols=True, mininterval=2)  # fmt: skip
    with bar, run.metrics:  # closed before an error is said, so its line is not written into the bar
        run_steps(run, bar)


def run_steps(run: Run, bar) -> None:
    """The loop: stage boundary, one optimizer step, the step's agreement, log, validate, checkpoint, stop."""
    cfg, total, step = run.cfg, run.cfg.stages.total_steps, run.start_step
    # the data-parallel rank's micro-batches: the ranks of a tensor-parallel group train on the same ones
    batches = rank_micro_batches(run.order, step * run.plan.global_batch_size, run.d.dp_rank, run.d.dp_world,
                                 run.plan.micro_batch_size)  # fmt: skip
    weighting, weighting_stage, save_s, alarmed = None, None, None, set()
    while step < total:
        stage = stage_of(step, run.starts)
        if stage != weighting_stage:  # stage boundary (or start): the stage's weighting, fitted there if need be
            weighting, weighting_stage, save_s = run.boundary.for_stage(stage, checkpoint_s=save_s), stage, None
        t0, lr = time.time(), run.engine.get_lr()[0]  # the lr this step uses (the scheduler steps inside eng.step)
        stats = train_step(run, batches, weighting, step)
        step += 1
        logged = step % cfg.run.log_every == 0 or step == total  # statistics reach the host only when logged
        stop, nonfinite, reduced = agree_on_step(run, stats, step, stage, logged)  # one exchange between the ranks
        bar.update(1)
        if reduced is not None:
            rec = step_record(run, step, stage, lr, time.time() - t0, weighting.version, reduced, nonfinite)
            alarmed = raise_alarm(run, rec, alarmed, weighting)
            run.metrics.log(rec)
            bar.set_postfix(stage=stage, loss=f"{rec['loss']:.3f}", gnorm=f"{_or_nan(rec['grad_norm']):.2f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
        run.nonfinite.check(step, stage, weighting.version, run.ckpt.last_tag)  # too many in a row: stop, unsaved
        boundary = step in run.starts[1:]
        if boundary or step == total or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
            run.metrics.log({"step": step, "stage": stage, **validate(run), "dwm": weighting.version}, kind="eval")
        if stop or boundary or step == total or step % cfg.run.checkpoint_every == 0:
            t_save, nf = time.time(), (run.nonfinite.total, run.nonfinite.streak)
            run.ckpt.save(run.engine, step=step, stage=stage, boundary=boundary, dwm=weighting.info,
                          final=step == total, nonfinite=nf)  # fmt: skip
            save_s = time.time() - t_save
        if stop and step < total:
            raise StoppedForTimeLimit(f"stopped at step {step} on SIGUSR1 with a complete checkpoint; rerun (or "
                                      "requeue) the same command to resume")  # fmt: skip


def train_step(run: Run, batches, weighting: Weighting, step: int) -> StepStats:
    """One optimizer step: every micro-batch weighed, forward, backward; DeepSpeed steps at the last one."""
    eng, stats, cuda = run.engine, StepStats(run.data.domain_names), run.d.accelerator == "cuda"
    fault_point("step", rank=run.d.rank, step=step + 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.d.device)
    for _ in range(run.plan.gradient_accumulation_steps):
        idx = next(batches)[1]
        x, dom = run.data.batch(idx).to(run.d.device), run.data.domain_ids(idx).to(run.d.device)
        w = weighting(x, idx, step)  # [B], mean 1; or a LossRule, applied to this forward's own losses
        if fault_active("nonfinite-loss", rank=run.d.rank, step=step + 1):
            w = w * float("nan")  # the loss and every gradient of this micro-batch become NaN (a LossRule too)
        loss, losses, applied = weighted_objective(eng, x, w, chunked=bool(run.cfg.model.loss_chunk_tokens))
        eng.backward(loss)
        eng.step()
        stats.add(losses, applied, dom)
    if cuda:
        stats.peak_memory(torch.cuda.max_memory_allocated(run.d.device))
    return stats


def agree_on_step(run: Run, stats: StepStats, step: int, stage: int, logged: bool) -> tuple[bool, bool, dict | None]:
    """Collective, one exchange: (a planned stop, whether the step was non-finite on any rank, the step's statistics
    over all ranks when it is ``logged`` or non-finite, else None); the non-finite step is counted and said."""
    skipped = not run.engine.was_step_applied()  # DeepSpeed skips a step whose gradient norm is not finite
    stop, bad_loss, reduced = stats.agree(run.stop.requested, logged)
    nonfinite = bad_loss or (skipped and run.precision != "fp16")  # fp16: an overflow is the loss scaler's business
    if nonfinite and reduced is None:  # a non-finite step is always logged: its statistics, at one more exchange
        reduced = stats.agree(False, True)[2]
    run.nonfinite.record(nonfinite)
    if nonfinite and run.d.is_main:
        log.warning(
            f"step {step} (stage {stage}): non-finite {'loss' if bad_loss else 'gradient norm'}; "
            f"{'the update was skipped' if skipped else 'the update was applied (its gradient was finite)'} "
            f"({run.nonfinite.streak} in a row, {run.nonfinite.total} in all; stop at "
            f"{run.cfg.run.stop_after_nonfinite} in a row)"
        )
    return stop, nonfinite, reduced


class StepStats:
    """Sums over the micro-batches of one optimizer step, kept on the device (no host sync per micro-batch);
    ``agree`` combines them over all ranks, with the step's stop and non-finite flags, in one exchange and one
    transfer to the host."""

    def __init__(self, domain_names: list[str] | tuple = ()):
        self.acc = None  # sum w*L, sum L, entropy, ess, micro-batches, then per domain: sum of weights, samples
        self.ext = None  # max of the weights, -min of the weights (, this step's peak device memory)
        self.memory, self.domain_names = False, list(domain_names)

    def add(self, losses: torch.Tensor, w: torch.Tensor, domains: torch.Tensor | None = None) -> None:
        """One micro-batch: its per-sample losses, weights and (``domain_names`` given) the samples' domain ids."""
        losses, w = losses.detach().float(), w.detach().float()
        ent, ess, lo, hi = weight_stats_tensor(w)
        row = torch.stack([(w * losses).mean(), losses.mean(), ent, ess, torch.ones_like(ent)]).double()
        if self.domain_names:  # per-domain sums of the weights and counts, on the device (no host sync)
            k = len(self.domain_names)
            by = torch.zeros(2 * k, dtype=torch.float64, device=w.device)
            by.index_add_(0, domains, w.double()).index_add_(0, domains + k, torch.ones_like(w, dtype=torch.float64))
            row = torch.cat([row, by])
        self.acc = row if self.acc is None else self.acc + row
        ext = torch.stack([hi, -lo])
        self.ext = ext if self.ext is None else torch.maximum(self.ext, ext)

    def peak_memory(self, nbytes: int) -> None:
        """This rank's peak allocated device memory in the step (reduced with the weights' maximum)."""
        self.ext, self.memory = torch.cat([self.ext, self.ext.new_tensor([float(nbytes)])]), True

    def nonfinite(self) -> torch.Tensor:
        """A device flag: a micro-batch of this step had a non-finite loss or weight (no host sync)."""
        return ~torch.isfinite(self.acc[:2]).all()

    def agree(self, stop: bool, with_stats: bool) -> tuple[bool, bool, dict | None]:
        """Collective, one exchange: (any rank asked to stop, any rank's loss was non-finite, with ``with_stats``
        the means over every micro-batch of every rank and the weights' min / max over all ranks, else None)."""
        flags = torch.stack([self.acc.new_tensor(float(stop)), self.nonfinite().double()])
        sums = self.acc if with_stats else self.acc[:0]
        maxes = torch.cat([flags, self.ext.double()]) if with_stats else flags
        rows = all_gather_rows(torch.cat([sums, maxes]))  # [world, k]: the sums and maxima taken here, alike
        vals = torch.cat([rows[:, : len(sums)].sum(0), rows[:, len(sums) :].max(0).values]).tolist()
        s, (stop_any, bad, *ext) = vals[: len(sums)], vals[len(sums) :]
        return stop_any > 0, bad > 0, _means(s, ext, self.memory, self.domain_names) if with_stats else None


def _means(s: list[float], ext: list[float], memory: bool, domain_names: list[str]) -> dict:
    """The logged statistics from the summed row and the maxima (weights' max, -min, peak memory); ``w_dom/NAME``:
    the mean weight of the step's samples of each domain that had any; ``n_dom/NAME``: how many it had (a blend's
    realized proportions, data.sources)."""
    hi, neg_lo, *mem = ext
    n, k = s[4], len(domain_names)
    sums, counts = s[5 : 5 + k], s[5 + k :]
    return {
        **({"peak_mem_gib": mem[0] / 2**30} if memory else {}),  # the largest over the ranks
        "loss": s[0] / n,
        "loss_unweighted": s[1] / n,
        "w_entropy": s[2] / n,
        "w_ess": s[3] / n,
        "w_min": -neg_lo,
        "w_max": hi,
        **{f"w_dom/{d}": w / c for d, w, c in zip(domain_names, sums, counts) if c > 0},
        **{f"n_dom/{d}": int(c) for d, c in zip(domain_names, counts) if c > 0},
    }


def step_record(run: Run, step, stage, lr, dt, dwm_version: str, stats: dict, nonfinite: bool) -> dict:
    """One metrics.jsonl record. ``grad_norm``: the global gradient norm before clipping (None: step skipped)."""
    tps = run.plan.tokens_per_step / dt
    norm = None if nonfinite or not run.engine.was_step_applied() else run.engine.get_global_grad_norm()
    rec = {
        "step": step,
        "stage": stage,
        "loss": stats["loss"],
        "loss_unweighted": stats["loss_unweighted"],
        "lr": lr,
        "grad_norm": None if norm is None else float(norm),
        "nonfinite": int(nonfinite),
        "nonfinite_steps": run.nonfinite.total,
        "tokens_per_s": tps,
        "samples_seen": step * run.plan.global_batch_size,
        "dwm": dwm_version,
        # w_dom/NAME, n_dom/NAME: per domain
        **{k: v for k, v in stats.items() if k.startswith(("w_", "n_dom/")) or k == "peak_mem_gib"},
        "step_time_s": dt,
        "time": time.time(),  #: when the step ended (unix seconds)
    }
    if (u := mfu(tps, run.flops_per_token, run.d.world, run.peak_flops)) is not None:  # GPUs only: absent on CPU
        rec["mfu"] = u
        if run.dwm_flops_per_token:  # the DWM's forward, beside the LM's (paper Eq. 9's overhead, measured)
            rec["mfu_dwm"] = mfu(tps, run.dwm_flops_per_token, run.d.world, run.peak_flops)
    return rec


def weight_alarm(stats: dict, micro_batch: int, ess_frac: float, max_frac: float) -> str:
    """Why a step's weights look collapsed ('' if they do not): mean ESS or the largest weight past a threshold."""
    why = []
    if stats["w_ess"] < ess_frac * micro_batch:
        why.append(f"mean ESS {stats['w_ess']:.2f} < {ess_frac:g} x {micro_batch}")
    if stats["w_max"] > max_frac * micro_batch:
        why.append(f"max weight {stats['w_max']:.2f} > {max_frac:g} x {micro_batch}")
    return "; ".join(why)


def raise_alarm(run: Run, rec: dict, alarmed: set, weighting: Weighting) -> set:
    """Mark collapsed weights in the step's record (metrics.jsonl, TensorBoard) and say so once per stage."""
    if not weighting.watch_collapse:  # uniform, or zeros by design: nothing to alarm about
        return alarmed
    why = weight_alarm(rec, run.plan.micro_batch_size, run.cfg.dwm.alarm_ess, run.cfg.dwm.alarm_max_weight)
    rec["w_alarm"] = int(bool(why))
    if why and rec["stage"] not in alarmed:
        if run.d.is_main:
            log.warning(
                f"ALARM stage {rec['stage']} step {rec['step']}: DWM weights collapsing ({why}); "
                "guards: meta.spread_penalty, dwm.uniform_mix, dwm.temperature, a smaller meta.lr"
            )
        return alarmed | {rec["stage"]}
    return alarmed


def validate(run: Run) -> dict:
    """Validation loss / accuracy of the LM on every set it reports, over all ranks (collective: every rank runs
    the same forwards): ``val_loss``, ``val_acc``, ``val_examples`` of the validation source's report part, and
    ``val_loss/NAME``, ``val_acc/NAME`` of every set."""
    eng, out = run.engine, {}
    for i, (name, val) in enumerate(run.vals.items()):
        got = validation_metrics(
            lambda b: eng(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
            val,
            run.cfg.run.eval_batches,
            run.plan.micro_batch_size,
            run.d.dp_rank,
            run.d.dp_world,
            run.d.device,
            counted=run.d.tp_rank == 0,  # a tensor-parallel group computed the same examples: counted once
        )
        out |= (got if i == 0 else {}) | {f"val_loss/{name}": got["val_loss"], f"val_acc/{name}": got["val_acc"]}
    eng.train()
    return out


def _or_nan(x: float | None) -> float:
    """A gradient norm for the progress bar: 0 stays 0 (a micro-batch weighted all 0), a missing one is nan."""
    return float("nan") if x is None else x
