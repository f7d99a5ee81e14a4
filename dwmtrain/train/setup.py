"""Everything before the loop: process group, data, engine, resume, stage boundary."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dwmtrain.accelerators import peak_flops
from dwmtrain.checkpoint import Checkpointer, compat_fields
from dwmtrain.config import BatchPlan, Config, batch_plan, build_deepspeed_config, resolve_precision
from dwmtrain.config.batch import data_parallel_size
from dwmtrain.config.stages import stage_starts
from dwmtrain.data.dataset import GlobalOrder, TokenDataset
from dwmtrain.data.mixture import BlendOrder, MixtureDataset, mixture_segment, open_training_data, source_plans
from dwmtrain.data.prepare import prepare_data
from dwmtrain.data.readers import Fields
from dwmtrain.data.tokenizer import check_vocab, load_tokenizer
from dwmtrain.data.validation import REPORT, ValidationSet, open_validation
from dwmtrain.distributed import Dist, barrier, cpu_threads, init_distributed, run_on_rank0
from dwmtrain.errors import ConfigError, DataError
from dwmtrain.fileio import atomic_write_text
from dwmtrain.models.dwm import DWMArch, dwm_forward_flops_per_token, dwm_parameter_count
from dwmtrain.models.spec import flops_per_token, lm_spec, model_flops_per_token
from dwmtrain.procs import usable_cpus
from dwmtrain.rundir import RunDir
from dwmtrain.stages.boundary import BoundaryInputs, StageBoundary
from dwmtrain.train.engine import build_engine
from dwmtrain.train.metrics import MetricsWriter
from dwmtrain.train.nonfinite import NonFiniteCount
from dwmtrain.train.stop import StopRequest

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Run:
    """The assembled training job the loop works on."""

    cfg: Config
    d: Dist
    rd: RunDir
    plan: BatchPlan
    precision: str  #: fp32 | bf16 | fp16, as resolved for this accelerator
    engine: object
    data: TokenDataset | MixtureDataset
    order: GlobalOrder | BlendOrder
    vals: dict[str, ValidationSet]  #: what validation reports, by name; the validation source's report part first
    ckpt: Checkpointer
    metrics: MetricsWriter
    boundary: StageBoundary
    starts: list[int]
    n_params: int
    stop: StopRequest
    nonfinite: NonFiniteCount
    start_step: int = 0
    peak_flops: float | None = None  # per device, for MFU (None off GPU or for an unknown GPU)
    flops_per_token: float = 0.0  #: the LM's model FLOPs per trained token (6N + attention)
    dwm_flops_per_token: float = 0.0  #: the DWM's forward per token (0: no DWM weighs this run)


def start_process_group(cfg: Config) -> tuple[Dist, RunDir]:
    """The process group, the threads per CPU rank, the seed, and the run directory on rank 0."""
    d = init_distributed(cfg.run.dist_timeout_s)
    d = dataclasses.replace(d, tp=cfg.deepspeed.tensor_parallel_size)
    data_parallel_size(d.world, d.tp)  # a world the tensor-parallel groups do not divide is refused here
    if d.accelerator == "cpu":
        torch.set_num_threads(cpu_threads(cfg.run.threads_per_rank, d.local_world))
    torch.manual_seed(cfg.run.seed)
    rd = RunDir(cfg.run.run_dir)
    if d.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
    barrier()
    return d, rd


def pin_model_config(cfg: Config, rd: RunDir, d: Dist) -> None:
    """A run from ``model.init_from`` keeps its model's config.json (``RUN_DIR/model_config.json``, on every node's
    storage) and names it as ``model.hf_config`` in the config.yaml it writes: a resume, the meta job, the export
    and the evaluation then never need the checkpoint directory again."""
    m = cfg.model
    if m.hf_config or not m.init_from:
        return

    def read() -> str:
        src = rd.model_config if rd.model_config.is_file() else Path(m.init_from) / "config.json"
        if not src.is_file():
            raise ConfigError(f"model.init_from={m.init_from}: {src} not found (and the run directory has no "
                              f"{rd.model_config.name} yet)")  # fmt: skip
        return src.read_text()

    text = run_on_rank0(read)
    if d.local_rank == 0 and not rd.model_config.is_file():
        rd.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.model_config, text)
    barrier()
    m.hf_config = str(rd.model_config)


def setup(cfg: Config) -> Run:
    d, rd = start_process_group(cfg)
    pin_model_config(cfg, rd, d)
    tok_sha = load_tokenizer(cfg.data.tokenizer).sha256
    spec = lm_spec(cfg.model)
    data = ensure_data(cfg, d, tok_sha, spec.vocab_size)
    vals = open_validation(cfg, rd, REPORT)  # a bad target set fails here, before the engine is built
    padded = bool(cfg.model.hf_config or cfg.model.init_from)
    check_vocab(load_tokenizer(cfg.data.tokenizer).vocab_size, spec.vocab_size, cfg.data.tokenizer, padded=padded)
    plan = batch_plan(cfg, d.world)
    starts = stage_starts(cfg.stages.total_steps, cfg.stages.num_stages, cfg.stages.boundaries)
    compat = compat_fields(cfg, d.world, plan.global_batch_size, spec, tok_sha, starts)
    engine, ckpt, resumed = engine_from_checkpoint(cfg, d, rd, spec, compat)
    arch = DWMArch.from_config(cfg, spec.vocab_size)
    precision = resolve_precision(cfg.deepspeed.precision, d.accelerator)
    dwm_dtype = torch.float32 if precision == "fp32" or cfg.dwm.dtype == "fp32" else torch.bfloat16
    start_step = resumed.step if resumed else 0
    consumed = start_step * plan.global_batch_size
    segment = run_on_rank0(lambda: mixture_segment(rd.data_mixture, cfg.data, start_step, consumed,
                                                        compat["data_sha"]))  # fmt: skip
    expect_sha = resumed.dwm_in_use(starts) if resumed else None
    nonfinite_so_far = (resumed.nonfinite_steps, resumed.nonfinite_streak) if resumed else (0, 0)
    metrics = MetricsWriter(rd, d.is_main, cfg.run.tensorboard, start_step if resumed else None, cfg)
    run = Run(
        cfg=cfg,
        d=d,
        rd=rd,
        plan=plan,
        precision=precision,
        engine=engine,
        data=data,
        order=data.order(cfg.run.seed, segment),
        vals=vals,
        ckpt=ckpt,
        metrics=metrics,
        boundary=StageBoundary(
            BoundaryInputs(
                cfg=cfg,
                d=d,
                rd=rd,
                arch=arch,
                dtype=dwm_dtype,
                starts=starts,
                tokenizer_sha=tok_sha,
                data=data,
                expect_sha=expect_sha or {},
                metrics=metrics,
            )
        ),  # fmt: skip
        starts=starts,
        n_params=spec.num_parameters(),
        stop=StopRequest(d.device),
        nonfinite=NonFiniteCount(cfg.run.stop_after_nonfinite, *nonfinite_so_far),
        start_step=start_step,
        peak_flops=peak_flops(torch.cuda.get_device_name() if d.accelerator == "cuda" else ""),
        flops_per_token=model_flops_per_token(spec, cfg.data.seq_len),
        dwm_flops_per_token=dwm_forward_flops_per_token(arch, cfg.data.seq_len) if cfg.meta.uses_dwm else 0.0,
    )
    announce(run, arch)
    return run


def engine_from_checkpoint(cfg: Config, d: Dist, rd: RunDir, spec, compat: dict):
    """(engine, checkpointer, the resumed state or None): the DeepSpeed engine, loaded from the newest checkpoint that
    verifies (an incompatible one is refused); the resolved config and DeepSpeed JSON written once it is known."""
    ds_config = build_deepspeed_config(cfg, d.world, d.accelerator)
    ckpt = Checkpointer(rd, d, compat=compat, global_batch_size=compat["global_batch_size"],
                        keep_last=cfg.run.keep_last, keep_stage=cfg.run.keep_stage_checkpoints,
                        boundary_weights=True)  # fmt: skip
    # continued pretraining reads model.init_from at the run's start only: a resume has the weights already
    engine = build_engine(cfg, ds_config, spec, d, "" if ckpt.has_checkpoint() else cfg.model.init_from)
    resumed = ckpt.resume(engine)  # None for a fresh run; refuses an incompatible checkpoint
    if d.is_main:  # only once the run is known to be compatible
        rd.config.write_text(cfg.to_yaml())
        rd.deepspeed_json.write_text(json.dumps(ds_config, indent=2))
    return engine, ckpt, resumed


def ensure_data(cfg: Config, d: Dist, tok_sha: str, vocab_size: int) -> TokenDataset | MixtureDataset:
    """Open the prepared shards or the blend of data.sources (rank 0 prepares train_data from ``data.raw`` first if
    it does not exist)."""
    path = Path(cfg.data.train_data)
    if not cfg.data.sources and not (path / "index.json").exists() and cfg.data.raw:

        def prepare() -> None:
            log.info(f"preparing {path} from {cfg.data.raw}")
            rep = prepare_data(
                cfg.data.raw,
                cfg.data.tokenizer,
                str(path),
                seq_len=cfg.data.seq_len,
                workers=usable_cpus(),
                progress=True,
                fields=Fields(cfg.data.text_field, cfg.data.domain_field),
            )
            log.info(rep.summary())

        run_on_rank0(prepare)  # the other ranks wait, in touch (see distributed.run_on_rank0)
    ds = open_training_data(cfg.data, vocab_size, tok_sha)
    if isinstance(ds, TokenDataset) and ds.seq_len != cfg.data.seq_len:
        raise DataError(f"{path}/index.json: prepared with seq_len={ds.seq_len}, but data.seq_len={cfg.data.seq_len}")
    if isinstance(ds, TokenDataset) and ds.index["tokenizer_sha256"] != tok_sha:
        raise DataError(
            f"{path} was tokenized with {ds.index['tokenizer']} (sha256 {ds.index['tokenizer_sha256'][:12]}...), "
            f"not data.tokenizer={cfg.data.tokenizer} ({tok_sha[:12]}...)"
        )
    return ds


def epochs_note(total_steps: int, global_batch: int, sequences: int) -> str:
    """What a run draws of its data: '' when every sequence is seen at most once, else how often and from which
    step the data repeats (the sample order is a fresh permutation per epoch)."""
    drawn = total_steps * global_batch
    if drawn <= sequences:
        return ""
    return (f"the run draws {drawn:,} sequences from {sequences:,} prepared: {drawn / sequences:.2f} epochs; the data "
            f"repeats (a new order) from step {sequences // global_batch + 1}")  # fmt: skip


def announce(run: Run, arch: DWMArch) -> None:
    """The start-up lines: model size, world, batch, stages, epochs, and the paper's Eq. 9 DWM overhead."""
    cfg, d, plan = run.cfg, run.d, run.plan
    if isinstance(run.data, MixtureDataset):
        for p in source_plans(run.data, run.order, cfg.stages.total_steps, plan.global_batch_size):
            log.info(f"data.sources {p.line(cfg.data.seq_len)}")
    elif note := epochs_note(cfg.stages.total_steps, plan.global_batch_size, len(run.data)):
        log.info(f"{cfg.data.train_data}: {note}")
    if cfg.meta.uses_dwm:
        p_w = dwm_parameter_count(arch)
        log.info(
            f"DWM overhead (paper Eq. 9): DWM forward 2*P_w = {flops_per_token(p_w, False):.3g} FLOPs/token vs "
            f"LM step 6*P = {flops_per_token(run.n_params, True):.3g} -> "
            f"expected +{100 * p_w / (3 * run.n_params):.1f}%",
        )
    log.info(
        f"LM {lm_spec(cfg.model).name}: {run.n_params:,} parameters; world {d.world} ({d.accelerator}, "
        f"{run.precision}, ZeRO-{cfg.deepspeed.zero_stage}"
        + (f", tensor parallel {d.tp} x data parallel {d.dp_world}" if d.tp > 1 else "")
        + f"); batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} accum x {d.dp_world} = "
        f"{plan.global_batch_size} seq ({plan.tokens_per_step:,} tokens); stages start at {run.starts}",
    )
