"""Everything before the loop: distributed init, data, engine, checkpoint resume, DWM hand-off."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dwmtrain.config import BatchPlan, Config, batch_plan, build_deepspeed_config, resolve_precision
from dwmtrain.data.dataset import GlobalOrder, TokenDataset
from dwmtrain.data.prepare import DataError, prepare_data
from dwmtrain.data.tokenizer import Tokenizer, check_vocab
from dwmtrain.distributed import Dist, barrier, init_distributed
from dwmtrain.fileio import sha256_file
from dwmtrain.models.dwm import DWMArch, dwm_parameter_count
from dwmtrain.models.lm import build_lm, count_parameters, flops_per_token, llama_config
from dwmtrain.stages.handoff import StageHandoff
from dwmtrain.stages.schedule import stage_starts
from dwmtrain.train.checkpoint import Checkpointer, check_compatible
from dwmtrain.train.evaluate import ValidationSet, validation_set
from dwmtrain.train.loss import default_warmup, lr_multiplier
from dwmtrain.train.metrics import MetricsWriter, peak_flops


@dataclass
class Run:
    """The assembled training job the loop works on."""

    cfg: Config
    d: Dist
    plan: BatchPlan
    engine: object
    data: TokenDataset
    order: GlobalOrder
    val: ValidationSet
    ckpt: Checkpointer
    metrics: MetricsWriter
    handoff: StageHandoff
    starts: list[int]
    n_params: int
    compat: dict
    start_step: int = 0
    peak_flops: float | None = None  # per device, for MFU (None off GPU or for an unknown GPU)


def log0(d: Dist, msg: str) -> None:
    if d.is_main:
        print(f"[dwmtrain] {msg}", flush=True)


def ensure_data(cfg: Config, d: Dist, tok_sha: str) -> TokenDataset:
    """Open the prepared shards (rank 0 prepares them from ``data.raw`` first if they do not exist)."""
    path = Path(cfg.data.train_data)
    if not (path / "index.json").exists() and cfg.data.raw:
        if d.is_main:
            log0(d, f"preparing {path} from {cfg.data.raw}")
            rep = prepare_data(
                cfg.data.raw,
                cfg.data.tokenizer,
                str(path),
                seq_len=cfg.data.seq_len,
                workers=max(1, (os.cpu_count() or 1)),
                progress=True,
            )
            print(rep.summary(), flush=True)
        barrier()
    ds = TokenDataset(path, "train", verify=cfg.data.verify)
    if ds.seq_len != cfg.data.seq_len:
        raise DataError(f"{path}/index.json: prepared with seq_len={ds.seq_len}, but data.seq_len={cfg.data.seq_len}")
    if ds.index["tokenizer_sha256"] != tok_sha:
        raise DataError(
            f"{path} was tokenized with {ds.index['tokenizer']} (sha256 {ds.index['tokenizer_sha256'][:12]}...), "
            f"not data.tokenizer={cfg.data.tokenizer} ({tok_sha[:12]}...)"
        )
    return ds


def setup(cfg: Config) -> Run:
    d = init_distributed(cfg.run.dist_timeout_s)
    if d.accelerator == "cpu":
        torch.set_num_threads(cfg.run.threads_per_rank or max(1, (os.cpu_count() or 1) // d.local_world))
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()

    tok_sha = sha256_file(cfg.data.tokenizer)
    data = ensure_data(cfg, d, tok_sha)
    vocab = Tokenizer(cfg.data.tokenizer).vocab_size
    model_vocab = llama_config(cfg.model.preset, cfg.model.vocab_size).vocab_size
    check_vocab(vocab, model_vocab, cfg.data.tokenizer)
    plan = batch_plan(cfg, d.world)
    precision = resolve_precision(cfg.deepspeed.precision, d.accelerator)
    ds_config = build_deepspeed_config(cfg, d.world, d.accelerator)
    starts = stage_starts(cfg.stages.total_steps, cfg.stages.num_stages, cfg.stages.boundaries)

    compat = {
        "model_preset": cfg.model.preset,
        "vocab_size": model_vocab,
        "max_seq_len": cfg.model.max_seq_len,
        "seq_len": cfg.data.seq_len,
        "tokenizer_sha256": tok_sha,
        "global_batch_size": plan.global_batch_size,
        "world_size": d.world,
        "dwm_backbone": cfg.dwm.backbone,
        "meta_mode": cfg.meta.mode,
        "data_sha": sha256_file(Path(cfg.data.train_data) / "index.json"),
        "seed": cfg.run.seed,
        "total_steps": cfg.stages.total_steps,
        "stage_starts": starts,
        "config_sha256": cfg.hash(),
    }
    ckpt = Checkpointer(run_dir / "checkpoints", d, cfg.run.keep_last, cfg.run.keep_stage_checkpoints)
    latest = ckpt.latest()
    if latest is not None:
        for note in check_compatible(latest.get("compat", {}), compat):
            log0(d, f"resume: config changed (allowed): {note}")
    if d.is_main:  # only once the run is known to be compatible
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))

    import deepspeed

    lm = build_lm(
        cfg.model.preset, model_vocab, cfg.model.max_seq_len, cfg.model.attn_implementation, seed=cfg.run.seed
    )
    warm = default_warmup(cfg.stages.total_steps, cfg.optimizer.warmup_steps)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda s: lr_multiplier(s, cfg.stages.total_steps, warm, cfg.optimizer.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=lm, model_parameters=lm.parameters(), config=ds_config, lr_scheduler=sched
    )
    start_step = 0
    if latest is not None:
        ckpt.load(engine, latest["tag"])
        start_step = int(latest["step"])
        log0(d, f"resumed from {ckpt.root / latest['tag']} at step {start_step} (stage {latest.get('stage')})")

    arch = DWMArch.from_config(cfg, model_vocab)
    dwm_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    val = validation_set(cfg)
    n_params = count_parameters(cfg.model.preset, model_vocab)
    run = Run(
        cfg,
        d,
        plan,
        engine,
        data,
        GlobalOrder(len(data), cfg.run.seed),
        val,
        ckpt,
        MetricsWriter(run_dir, d.is_main, cfg.run.tensorboard, start_step if latest else None),
        StageHandoff(cfg, d, arch, dwm_dtype),
        starts,
        n_params,
        compat,
        start_step,
        peak_flops(torch.cuda.get_device_name() if d.accelerator == "cuda" else ""),
    )
    if latest is not None and latest.get("dwm", {}).get("sha256") and start_step not in starts:
        run.handoff.expect_sha[int(latest["stage"])] = latest["dwm"]["sha256"]  # resumed mid-stage
    if cfg.meta.mode != "none":
        p_w = dwm_parameter_count(arch)
        log0(
            d,
            f"DWM overhead (paper Eq. 9): DWM forward 2*P_w = {flops_per_token(p_w, False):.3g} FLOPs/token vs "
            f"LM step 6*P = {flops_per_token(n_params, True):.3g} -> expected +{100 * p_w / (3 * n_params):.1f}%",
        )
    log0(
        d,
        f"LM {cfg.model.preset}: {n_params:,} parameters; world {d.world} ({d.accelerator}, {precision}); "
        f"batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} accum x {d.world} = "
        f"{plan.global_batch_size} seq ({plan.tokens_per_step:,} tokens); stages start at {starts}",
    )
    return run
