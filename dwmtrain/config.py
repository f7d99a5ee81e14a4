"""One typed config tree for a dwmtrain run.

YAML file -> dotted ``key=value`` overrides -> dataclasses that validate themselves.
The DeepSpeed JSON is *generated* from this tree plus a ZeRO template in
``dwmtrain/ds_configs/``, so micro-batch, accumulation, precision and the global batch live
in one place (``DeepSpeedConfig``) and are checked against each other and the world size.

Everything the config refers to by default ships inside the package: the ZeRO templates, the
bundled configs (``--config tiny``) and the sample corpus, named ``dwmtrain:data/corpus/...``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dwmtrain.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DS_TEMPLATE_DIR = PACKAGE_DIR / "ds_configs"
CONFIG_DIR = PACKAGE_DIR / "configs"
PACKAGE_PREFIX = "dwmtrain:"  # a path inside the installed package, e.g. dwmtrain:data/corpus/sample.jsonl.zst


def package_path(path: str) -> str:
    """``dwmtrain:REL`` -> the absolute path of REL inside the package; any other path unchanged."""
    return str(PACKAGE_DIR / path[len(PACKAGE_PREFIX) :]) if path.startswith(PACKAGE_PREFIX) else path


def bundled_configs() -> list[str]:
    """Names of the configs shipped in the package (``--config NAME``), experiments included."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def _check(cond: bool, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {why}")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


def _positive(name: str, value: Any) -> None:
    _check(isinstance(value, (int, float)) and value > 0, name, value, "must be > 0")


@dataclass
class RunConfig:
    """Where and how the run records itself."""

    name: str = "dwm"  #: free-form run name, shown in logs
    run_dir: str = "runs/dwm"  #: all outputs: checkpoints, DWM files, metrics, logs (``--run-dir`` sets it)
    seed: int = 1234  #: seeds data order, model init and DWM init
    log_every: int = 1  #: write a metrics.jsonl record every N optimizer steps
    checkpoint_every: int = 100  #: sharded checkpoint every N steps (stage boundaries always checkpoint)
    keep_last: int = 3  #: keep the newest k periodic checkpoints (stage-boundary ones are kept too)
    keep_stage_checkpoints: bool = True  #: never prune checkpoints taken at stage boundaries
    eval_every: int = 0  #: validation loss/accuracy every N steps (0: only at stage ends)
    eval_batches: int = 4  #: validation micro-batches per evaluation
    tensorboard: bool = True  #: write TensorBoard event files under run_dir/tensorboard
    dist_timeout_s: int = 600  #: a collective (or the rendezvous) waiting longer ends the job: a dead or hung rank
    threads_per_rank: int = 0  #: torch intra-op threads per rank on CPU (0: cores / local ranks)
    #: a step with a non-finite loss or gradient norm is skipped (no update, the LR schedule waits) and counted;
    #: this many in a row stop the run (exit 2) before that step is saved, so a rerun resumes from a sound state
    stop_after_nonfinite: int = 5

    def __post_init__(self):
        _check(bool(self.run_dir), "run.run_dir", self.run_dir, "must be set")
        for f in (
            "log_every",
            "checkpoint_every",
            "keep_last",
            "eval_batches",
            "dist_timeout_s",
            "stop_after_nonfinite",
        ):
            _positive(f"run.{f}", getattr(self, f))
        _check(self.eval_every >= 0, "run.eval_every", self.eval_every, "must be >= 0")
        _check(self.threads_per_rank >= 0, "run.threads_per_rank", self.threads_per_rank, "must be >= 0")


@dataclass
class ModelConfig:
    """The language model being pretrained."""

    preset: str = "tiny"  #: tiny | small | 370m | 1.3b (see dwmtrain.models.spec.PRESETS)
    vocab_size: int = 0  #: 0: the preset's; must equal the tokenizer's vocabulary
    max_seq_len: int = 0  #: 0: the preset's context (1024 for the paper presets)
    attn_implementation: str = "sdpa"  #: sdpa (fused kernels) | eager
    #: the training loss applies the LM head this many tokens at a time, never holding the full
    #: [tokens, vocab] logits (models.loss.fused_weighted_loss); 0: the full-logits path
    loss_chunk_tokens: int = 1024

    def __post_init__(self):
        from dwmtrain.models.spec import ATTN_IMPLEMENTATIONS, PRESETS

        _one_of("model.preset", self.preset, tuple(PRESETS))
        _check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0")
        _check(self.max_seq_len >= 0, "model.max_seq_len", self.max_seq_len, "must be >= 0")
        _one_of("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check(self.loss_chunk_tokens >= 0, "model.loss_chunk_tokens", self.loss_chunk_tokens, "must be >= 0")


@dataclass
class DataConfig:
    """Prepared token shards, tokenizer and validation data."""

    train_data: str = "runs/data/sample"  #: directory written by ``dwmtrain prepare-data``
    tokenizer: str = "runs/data/tokenizer.model"  #: sentencepiece model used to prepare the data
    seq_len: int = 1024  #: packed sequence length; must equal the prepared data's
    val_source: str = "lambada"  #: lambada (the paper) | heldout (the DWM_VAL ablation)
    lambada_path: str = "dwmtrain:data/corpus/lambada_sample.jsonl"  #: lambada_openai-format JSONL
    raw: list[str] = field(default_factory=list)  #: JSONL(.zst) inputs to prepare train_data from if missing
    heldout_data: str = ""  #: val_source=heldout: prepared dir whose heldout split validates ("": train_data)
    verify: str = "size"  #: shard check at load: size (cheap) | sha256 (reads everything)

    def __post_init__(self):
        # bundled files (``dwmtrain:...``) become absolute paths into the installed package
        self.tokenizer, self.lambada_path = package_path(self.tokenizer), package_path(self.lambada_path)
        self.raw = [package_path(r) for r in self.raw]
        _positive("data.seq_len", self.seq_len)
        _one_of("data.val_source", self.val_source, ("lambada", "heldout"))
        _one_of("data.verify", self.verify, ("size", "sha256"))


@dataclass
class DWMConfig:
    """The Data Weighting Model: backbone embeds samples, attention across the micro-batch, 2 linears."""

    backbone: str = "tiny"  #: LM preset of the backbone (the paper: 370m)
    attn_heads: int = 4  #: heads of the cross-sample attention block
    head_hidden: int = 0  #: hidden width of the 2-layer head (0: backbone hidden size)
    pooling: str = "mean"  #: mean | last: how token states become one embedding per sample
    temperature: float = 1.0  #: temperature of the weights (logits / T)
    normalization: str = "softmax"  #: softmax (B * softmax(z/T)) | sigmoid (keep-gates renormalized to mean 1)
    uniform_mix: float = 0.0  #: w <- (1-u) w + u, guards against collapse onto few samples
    init_backbone_from_lm: bool = True  #: first boundary: copy the LM into the backbone (as the paper)
    alarm_ess: float = 0.5  #: alarm when a step's mean ESS falls below this fraction of the micro-batch (collapse)
    alarm_max_weight: float = 0.5  #: alarm when one sample's weight exceeds this fraction of the micro-batch size
    #: torch.compile the frozen DWM's forward on the trainer ranks: 0.88x its time on CPU at small, after ~30 s
    #: of compiling per process (tools/bench.py --only dwmcompile); pays on long runs, not in short tests
    compile: bool = False

    def __post_init__(self):
        from dwmtrain.models.dwm import NORMALIZATIONS, POOLINGS
        from dwmtrain.models.spec import PRESETS

        _one_of("dwm.backbone", self.backbone, tuple(PRESETS))
        _positive("dwm.attn_heads", self.attn_heads)
        _check(self.head_hidden >= 0, "dwm.head_hidden", self.head_hidden, "must be >= 0")
        _one_of("dwm.pooling", self.pooling, POOLINGS)
        _one_of("dwm.normalization", self.normalization, NORMALIZATIONS)
        _positive("dwm.temperature", self.temperature)
        _check(0.0 <= self.uniform_mix <= 1.0, "dwm.uniform_mix", self.uniform_mix, "must be in [0, 1]")
        _check(0.0 <= self.alarm_ess <= 1.0, "dwm.alarm_ess", self.alarm_ess, "must be in [0, 1]")
        _check(0.0 < self.alarm_max_weight <= 1.0, "dwm.alarm_max_weight", self.alarm_max_weight, "must be in (0, 1]")


@dataclass
class StagesConfig:
    """Training is split into stages; the DWM is refit at each boundary. Stage 1 is uniform."""

    total_steps: int = 100  #: optimizer steps of the whole run
    num_stages: int = 5  #: T; boundaries split total_steps evenly unless ``boundaries`` is given
    boundaries: list[int] = field(default_factory=list)  #: explicit start steps of stages 2..T

    def __post_init__(self):
        _positive("stages.total_steps", self.total_steps)
        _positive("stages.num_stages", self.num_stages)
        from dwmtrain.stages.schedule import stage_starts

        try:
            stage_starts(self.total_steps, self.num_stages, list(self.boundaries))
        except ValueError as e:  # name the field the user set: boundaries if given, else the stage count
            if self.boundaries:
                raise ConfigError(f"stages.boundaries={self.boundaries!r}: {e}") from None
            raise ConfigError(f"stages.num_stages={self.num_stages}: {e}") from None


@dataclass
class MetaConfig:
    """How the DWM is obtained at stage boundaries."""

    mode: str = "bilevel"  #: none | fixed (``dwm_path``) | transfer (``dwm_run``) | oracle (``oracle_drop``) | bilevel
    dwm_path: str = ""  #: fixed mode: a DWM checkpoint (.safetensors) used from step 0 on
    dwm_run: str = ""  #: transfer mode: a finished bilevel run whose stage-K DWM weighs stage K here (no meta job)
    oracle_drop: list[str] = field(default_factory=list)  #: oracle mode: domains weighted 0 (a headroom baseline)
    oracle_from_stage: int = 1  #: oracle mode: first stage it weighs (2: uniform stage 1, like the DWM's schedule)
    launch: str = "local"  #: local: rank 0 runs the meta job on this node | external: stop, run it yourself
    steps: int = 20  #: K meta-steps (Adam on the DWM) per boundary
    #: R(theta), the validation loss before the lookahead, is for the log only (an extra forward): computed at
    #: the first and last meta-step and every log_every-th
    log_every: int = 10
    lr: float = 1e-4  #: Adam learning rate of the DWM
    lookahead_lr: float = 0.0  #: alpha of the lookahead step; 0: the LM's learning rate at the boundary
    grad_mode: str = "fd"  #: fd (finite differences, production) | per_sample | jvp | unrolled (reference)
    #: fd mode: norm of the parameter perturbation along v = grad L_val(theta*); 0: by the LM's dtype and
    #: parameter norm (meta.metagrad.FD_EPS; fp32: max(3e-4 x the norm, 0.02), measured most accurate)
    fd_eps: float = 0.0
    val_batch_size: int = 8  #: validation examples per meta-step
    nproc: int = 1  #: data-parallel processes of the meta job (GPUs, or CPU processes)
    timeout_s: int = 3600  #: training stops with a resumable checkpoint if the meta job takes longer
    backbone_trainable: bool = True  #: train the DWM backbone too (False: only attention + linears)
    normalize_grad: bool = True  #: standardize dR/dw over each micro-batch: scale-free meta-steps
    spread_penalty: float = 0.5  #: collapse guard: + spread_penalty * var(log w); in units of normalize_grad (0: off)
    calibrate_batches: int = 0  #: after fitting, shrink the DWM by its agreement with dR/dw on N unseen micro-batches
    calibrate_rho: float = 0.5  #: agreement at which the fitted DWM is kept at full strength (less: shrunk)

    def __post_init__(self):
        _one_of("meta.mode", self.mode, ("none", "fixed", "transfer", "oracle", "bilevel"))
        _one_of("meta.launch", self.launch, ("local", "external"))
        _one_of("meta.grad_mode", self.grad_mode, ("fd", "per_sample", "jvp", "unrolled"))
        if self.mode == "fixed":
            _check(bool(self.dwm_path), "meta.dwm_path", self.dwm_path, "meta.mode=fixed needs a DWM file")
        if self.mode == "oracle":
            _check(
                bool(self.oracle_drop), "meta.oracle_drop", self.oracle_drop, "meta.mode=oracle needs domains to drop"
            )
        _check(self.oracle_from_stage >= 1, "meta.oracle_from_stage", self.oracle_from_stage, "must be >= 1")
        _check(self.spread_penalty >= 0, "meta.spread_penalty", self.spread_penalty, "must be >= 0")
        _check(self.calibrate_batches >= 0, "meta.calibrate_batches", self.calibrate_batches, "must be >= 0")
        _positive("meta.calibrate_rho", self.calibrate_rho)
        if self.mode == "transfer":
            _check(bool(self.dwm_run), "meta.dwm_run", self.dwm_run, "meta.mode=transfer needs a bilevel run directory")
        _check(self.fd_eps >= 0, "meta.fd_eps", self.fd_eps, "must be >= 0 (0: by the LM's dtype and norm)")
        for f in ("steps", "log_every", "lr", "val_batch_size", "nproc", "timeout_s"):
            _positive(f"meta.{f}", getattr(self, f))
        _check(self.lookahead_lr >= 0, "meta.lookahead_lr", self.lookahead_lr, "must be >= 0")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay (the paper: lr 5e-4, betas 0.9/0.95, eps 1e-8)."""

    lr: float = 5e-4  #: peak learning rate (reached after warmup)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  #: AdamW beta1, beta2
    eps: float = 1e-8  #: AdamW epsilon
    weight_decay: float = 0.1  #: decoupled weight decay (AdamW)
    warmup_steps: int = 0  #: linear warmup steps; 0: 1% of total steps
    min_lr_ratio: float = 0.1  #: cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  #: 0 disables clipping

    def __post_init__(self):
        _positive("optimizer.lr", self.lr)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        _positive("optimizer.eps", self.eps)
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "must be >= 0")


@dataclass
class DeepSpeedConfig:
    """Batch arithmetic and ZeRO settings; the only place batch sizes are written."""

    template: str = "zero3"  #: zero3 | zero3_offload | a path to a JSON template
    micro_batch_size: int = 8  #: sequences per rank per forward (the DWM scores these together)
    global_batch_size: int = 0  #: sequences per optimizer step (0: from global_batch_tokens or accum)
    global_batch_tokens: int = 0  #: tokens per optimizer step (the paper: 4M = 4096 x 1024)
    gradient_accumulation_steps: int = 0  #: 0: derived from the global batch and world size
    precision: str = "auto"  #: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32

    def __post_init__(self):
        _positive("deepspeed.micro_batch_size", self.micro_batch_size)
        for f in ("global_batch_size", "global_batch_tokens", "gradient_accumulation_steps"):
            _check(getattr(self, f) >= 0, f"deepspeed.{f}", getattr(self, f), "must be >= 0")
        _one_of("deepspeed.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        if self.template not in ("zero3", "zero3_offload"):
            _check(Path(self.template).is_file(), "deepspeed.template", self.template, "no such template")


@dataclass
class Config:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dwm: DWMConfig = field(default_factory=DWMConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self):
        # Cross-section checks: things no single section can see (the world size is checked at launch).
        global_batch_sequences(self.deepspeed.global_batch_size, self.deepspeed.global_batch_tokens, self.data.seq_len)
        if self.model.max_seq_len:
            _check(
                self.data.seq_len <= self.model.max_seq_len,
                "data.seq_len",
                self.data.seq_len,
                f"exceeds model.max_seq_len={self.model.max_seq_len}",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """sha256 of the resolved config (recorded in every checkpoint)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}: unknown field{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _from_dict(typ, value, name)
        else:
            kwargs[key] = _coerce(typ, value, name)
    return cls(**kwargs)


def _coerce(typ, value, name):
    origin = typing.get_origin(typ)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: expected a list")
        (inner,) = typing.get_args(typ)
        return [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-4" as a string
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{name}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. stages.num_stages=5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.strip(), value


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file, or a bundled config's name (``tiny``, ``experiments/tiny/random_dwm``)."""
    if not Path(path).exists() and (CONFIG_DIR / f"{path}.yaml").is_file():
        return CONFIG_DIR / f"{path}.yaml"
    return Path(path)


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_config_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """The YAML mapping of a config file, with its ``base:`` config (a bundled name or a path relative to the
    file) merged underneath: experiment configs state only what differs from the preset they start from."""
    path = resolve_config_path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: base configs form a cycle ({' -> '.join(map(str, _seen))})")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base={base!r}: must name a config")
    rel = path.parent / base
    base_path = rel if rel.is_file() else resolve_config_path(base)
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base={base!r}: no such config (a bundled name or a relative path)")
    return _merge(read_config_tree(base_path, (*_seen, path.resolve())), tree)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config (a file, or a bundled config's name), apply dotted overrides, validate."""
    tree = read_config_tree(path) if path is not None else {}
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(tree, key, value)
    return _from_dict(Config, tree, "")


# --------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch sizes: global = micro * accum * world."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    global_batch_size: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def global_batch_sequences(global_batch: int, global_tokens: int, seq_len: int) -> int:
    """Sequences per optimizer step from ``global_batch_size`` / ``global_batch_tokens`` (0: not set)."""
    if not global_tokens:
        return global_batch
    _check(
        global_tokens % seq_len == 0,
        "deepspeed.global_batch_tokens",
        global_tokens,
        f"must be a multiple of data.seq_len={seq_len}",
    )
    _check(
        not global_batch or global_batch * seq_len == global_tokens,
        "deepspeed.global_batch_size",
        global_batch,
        f"contradicts deepspeed.global_batch_tokens={global_tokens} "
        f"(= {global_tokens // seq_len} sequences of {seq_len})",
    )
    return global_tokens // seq_len


def resolve_batch(
    micro: int, world: int, seq_len: int, global_batch: int = 0, global_tokens: int = 0, accum: int = 0
) -> BatchPlan:
    """Check micro-batch, accumulation, global batch and world size against each other."""
    if world <= 0:
        raise ConfigError(f"world_size={world}: must be > 0")
    global_batch = global_batch_sequences(global_batch, global_tokens, seq_len)
    per_step = micro * world
    if global_batch:
        if global_batch % per_step:
            raise ConfigError(
                f"deepspeed.global_batch_size={global_batch}: not divisible by micro_batch_size x world_size "
                f"= {micro} x {world} = {per_step}"
            )
        derived = global_batch // per_step
        if accum and accum != derived:
            raise ConfigError(
                f"deepspeed.gradient_accumulation_steps={accum}: contradicts global batch {global_batch} = "
                f"{micro} x {world} x {derived}"
            )
        accum = derived
    else:
        accum = accum or 1
        global_batch = per_step * accum
    return BatchPlan(micro, accum, world, global_batch, seq_len)


def batch_plan(cfg: Config, world: int) -> BatchPlan:
    ds = cfg.deepspeed
    return resolve_batch(
        ds.micro_batch_size,
        world,
        cfg.data.seq_len,
        ds.global_batch_size,
        ds.global_batch_tokens,
        ds.gradient_accumulation_steps,
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision == "auto":
        return "fp32" if accelerator == "cpu" else "bf16"
    if accelerator == "cpu" and precision != "fp32":
        raise ConfigError(f"deepspeed.precision={precision}: the CPU accelerator trains in fp32")
    return precision


def build_deepspeed_config(cfg: Config, world: int, accelerator: str) -> dict:
    """Generate the DeepSpeed JSON from the config tree plus a ZeRO template."""
    ds = cfg.deepspeed
    tpath = DS_TEMPLATE_DIR / f"{ds.template}.json" if "/" not in ds.template else Path(ds.template)
    if not tpath.is_file() and Path(ds.template).is_file():
        tpath = Path(ds.template)
    try:
        template = json.loads(tpath.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.template={ds.template!r}: {tpath} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed template {tpath}: invalid JSON at line {e.lineno}: {e.msg}") from None
    for forbidden in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if forbidden in template:
            raise ConfigError(
                f"deepspeed template {tpath}: {forbidden} belongs in the run config (deepspeed.*), not the template"
            )
    plan = batch_plan(cfg, world)
    prec = resolve_precision(ds.precision, accelerator)
    out = dict(template)
    out.update(
        train_batch_size=plan.global_batch_size,
        train_micro_batch_size_per_gpu=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        gradient_clipping=cfg.optimizer.grad_clip,
        bf16={"enabled": prec == "bf16"},
        fp16={"enabled": prec == "fp16"},
        steps_per_print=10**9,  # we log ourselves
        wall_clock_breakdown=False,
    )
    opt = cfg.optimizer
    out["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
        },
    }
    if accelerator == "cpu" and not out.get("zero_optimization", {}).get("offload_optimizer"):
        # The fused CUDA Adam does not exist on the CPU accelerator; torch's AdamW does the same math.
        out["optimizer"]["params"]["torch_adam"] = True
    return out
