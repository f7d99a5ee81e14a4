"""Everything before the loop: process group, data, engine, resume, DWM hand-off."""

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
from dwmtrain.distributed import Dist, barrier, cpu_threads, init_distributed, run_on_rank0
from dwmtrain.fileio import sha256_file
from dwmtrain.models.dwm import DWMArch, dwm_parameter_count
from dwmtrain.models.lm import count_parameters, flops_per_token, llama_config
from dwmtrain.rundir import RunDir
from dwmtrain.stages.handoff import StageHandoff
from dwmtrain.stages.schedule import stage_starts
from dwmtrain.train.checkpoint import Checkpointer
from dwmtrain.train.engine import build_engine
from dwmtrain.train.evaluate import ValidationSet, validation_set
from dwmtrain.train.metrics import MetricsWriter, peak_flops
from dwmtrain.train.stop import StopRequest


@dataclass(kw_only=True)
class Run:
    """The assembled training job the loop works on."""

    cfg: Config
    d: Dist
    rd: RunDir
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
    stop: StopRequest
    start_step: int = 0
    peak_flops: float | None = None  # per device, for MFU (None off GPU or for an unknown GPU)


def log0(d: Dist, msg: str) -> None:
    if d.is_main:
        print(f"[dwmtrain] {msg}", flush=True)


def setup(cfg: Config) -> Run:
    d = init_distributed(cfg.run.dist_timeout_s)
    if d.accelerator == "cpu":
        torch.set_num_threads(cpu_threads(cfg.run.threads_per_rank, d.local_world))
    torch.manual_seed(cfg.run.seed)
    rd = RunDir(cfg.run.run_dir)
    if d.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
    barrier()

    tok_sha = sha256_file(cfg.data.tokenizer)
    data = ensure_data(cfg, d, tok_sha)
    vocab = llama_config(cfg.model.preset, cfg.model.vocab_size).vocab_size
    check_vocab(Tokenizer(cfg.data.tokenizer).vocab_size, vocab, cfg.data.tokenizer)
    plan = batch_plan(cfg, d.world)
    starts = stage_starts(cfg.stages.total_steps, cfg.stages.num_stages, cfg.stages.boundaries)
    ds_config = build_deepspeed_config(cfg, d.world, d.accelerator)
    compat = compat_fields(cfg, d.world, plan, vocab, tok_sha, starts)
    ckpt = Checkpointer(
        rd,
        d,
        compat=compat,
        global_batch_size=plan.global_batch_size,
        keep_last=cfg.run.keep_last,
        keep_stage=cfg.run.keep_stage_checkpoints,
        boundary_weights=True,
    )
    engine = build_engine(cfg, ds_config, vocab)
    resumed = ckpt.resume(engine)  # None for a fresh run; refuses an incompatible checkpoint
    if d.is_main:  # only once the run is known to be compatible
        rd.config.write_text(cfg.to_yaml())
        rd.deepspeed_json.write_text(json.dumps(ds_config, indent=2))

    arch = DWMArch.from_config(cfg, vocab)
    dwm_dtype = torch.float32 if resolve_precision(cfg.deepspeed.precision, d.accelerator) == "fp32" else torch.bfloat16
    start_step = resumed.step if resumed else 0
    run = Run(
        cfg=cfg,
        d=d,
        rd=rd,
        plan=plan,
        engine=engine,
        data=data,
        order=GlobalOrder(len(data), cfg.run.seed),
        val=validation_set(cfg),
        ckpt=ckpt,
        metrics=MetricsWriter(rd, d.is_main, cfg.run.tensorboard, start_step if resumed else None),
        handoff=StageHandoff(cfg, d, arch, dwm_dtype, rd, resumed.dwm_in_use(starts) if resumed else None, data=data),
        starts=starts,
        n_params=count_parameters(cfg.model.preset, vocab),
        stop=StopRequest(),
        start_step=start_step,
        peak_flops=peak_flops(torch.cuda.get_device_name() if d.accelerator == "cuda" else ""),
    )
    announce(run, arch)
    return run


def ensure_data(cfg: Config, d: Dist, tok_sha: str) -> TokenDataset:
    """Open the prepared shards (rank 0 prepares them from ``data.raw`` first if they do not exist)."""
    path = Path(cfg.data.train_data)
    if not (path / "index.json").exists() and cfg.data.raw:

        def prepare() -> None:
            log0(d, f"preparing {path} from {cfg.data.raw}")
            rep = prepare_data(
                cfg.data.raw,
                cfg.data.tokenizer,
                str(path),
                seq_len=cfg.data.seq_len,
                workers=max(1, os.cpu_count() or 1),
                progress=True,
            )
            print(rep.summary(), flush=True)

        run_on_rank0(prepare)  # the other ranks wait, in touch (see distributed.run_on_rank0)
    ds = TokenDataset(path, "train", verify=cfg.data.verify)
    if ds.seq_len != cfg.data.seq_len:
        raise DataError(f"{path}/index.json: prepared with seq_len={ds.seq_len}, but data.seq_len={cfg.data.seq_len}")
    if ds.index["tokenizer_sha256"] != tok_sha:
        raise DataError(
            f"{path} was tokenized with {ds.index['tokenizer']} (sha256 {ds.index['tokenizer_sha256'][:12]}...), "
            f"not data.tokenizer={cfg.data.tokenizer} ({tok_sha[:12]}...)"
        )
    return ds


def compat_fields(cfg: Config, world: int, plan: BatchPlan, vocab: int, tok_sha: str, starts: list[int]) -> dict:
    """What every checkpoint records and a resume compares (train.checkpoint.BREAKING says which break it)."""
    return {
        "model_preset": cfg.model.preset,
        "vocab_size": vocab,
        "max_seq_len": cfg.model.max_seq_len,
        "seq_len": cfg.data.seq_len,
        "tokenizer_sha256": tok_sha,
        "global_batch_size": plan.global_batch_size,
        "world_size": world,
        "dwm_backbone": cfg.dwm.backbone,
        "meta_mode": cfg.meta.mode,
        "data_sha": sha256_file(Path(cfg.data.train_data) / "index.json"),
        "seed": cfg.run.seed,
        "total_steps": cfg.stages.total_steps,
        "stage_starts": starts,
        "config_sha256": cfg.hash(),
    }


def announce(run: Run, arch: DWMArch) -> None:
    """The start-up lines: model size, world, batch, stages, and the paper's Eq. 9 DWM overhead."""
    cfg, d, plan = run.cfg, run.d, run.plan
    if cfg.meta.mode not in ("none", "oracle"):
        p_w = dwm_parameter_count(arch)
        log0(
            d,
            f"DWM overhead (paper Eq. 9): DWM forward 2*P_w = {flops_per_token(p_w, False):.3g} FLOPs/token vs "
            f"LM step 6*P = {flops_per_token(run.n_params, True):.3g} -> "
            f"expected +{100 * p_w / (3 * run.n_params):.1f}%",
        )
    log0(
        d,
        f"LM {cfg.model.preset}: {run.n_params:,} parameters; world {d.world} ({d.accelerator}, "
        f"{resolve_precision(cfg.deepspeed.precision, d.accelerator)}); batch {plan.micro_batch_size} x "
        f"{plan.gradient_accumulation_steps} accum x {d.world} = {plan.global_batch_size} seq "
        f"({plan.tokens_per_step:,} tokens); stages start at {run.starts}",
    )
