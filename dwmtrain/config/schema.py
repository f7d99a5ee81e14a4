"""The typed config tree of a run: one dataclass per section, each documenting its fields and validating itself
when created (errors name ``section.field=value``).

Everything the config refers to by default ships inside the package: the ZeRO templates, the bundled configs
(``--config tiny``) and the sample corpus, named ``dwmtrain:data/corpus/...``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dwmtrain.config.batch import global_batch_sequences
from dwmtrain.config.checks import check, one_of, positive
from dwmtrain.config.stages import stage_starts
from dwmtrain.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_PREFIX = "dwmtrain:"  # a path inside the installed package, e.g. dwmtrain:data/corpus/sample.jsonl.zst


def package_path(path: str) -> str:
    """``dwmtrain:REL`` -> the absolute path of REL inside the package; any other path unchanged."""
    return str(PACKAGE_DIR / path[len(PACKAGE_PREFIX) :]) if path.startswith(PACKAGE_PREFIX) else path


@dataclass
class WandbConfig:
    """Weights & Biases tracking of a training run, from rank 0 (disabled by default)."""

    #: disabled | online | offline (W&B's own modes; offline: written under RUN_DIR/wandb without a network,
    #: ``wandb sync`` uploads it later)
    mode: str = "disabled"
    project: str = "dwmtrain"  #: the W&B project
    entity: str = ""  #: the W&B team or user ('': the logged-in default)
    name: str = ""  #: the run's display name ('': run.name)

    def __post_init__(self):
        one_of("run.wandb.mode", self.mode, ("disabled", "online", "offline"))
        check(bool(self.project), "run.wandb.project", self.project, "must be set")


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
    log_level: str = "info"  #: debug | info | warning: what rank 0 says (dwmtrain.log)
    log_all_ranks: bool = False  #: every rank says what rank 0 says (each line names its rank)
    dist_timeout_s: int = 600  #: a collective (or the rendezvous) waiting longer ends the job: a dead or hung rank
    threads_per_rank: int = 0  #: torch intra-op threads per rank on CPU (0: cores / local ranks)
    #: a step with a non-finite loss or gradient norm is skipped (no update, the LR schedule waits) and counted;
    #: this many in a row stop the run (exit 2) before that step is saved, so a rerun resumes from a sound state
    stop_after_nonfinite: int = 5
    #: every metrics.jsonl / eval.jsonl record, the resolved config, the stage boundaries and the meta-update logs
    #: to W&B; a rerun continues the same W&B run (its id is kept in RUN_DIR/wandb_id)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        one_of("run.log_level", self.log_level, ("debug", "info", "warning"))
        check(bool(self.run_dir), "run.run_dir", self.run_dir, "must be set")
        for f in (
            "log_every",
            "checkpoint_every",
            "keep_last",
            "eval_batches",
            "dist_timeout_s",
            "stop_after_nonfinite",
        ):
            positive(f"run.{f}", getattr(self, f))
        check(self.eval_every >= 0, "run.eval_every", self.eval_every, "must be >= 0")
        check(self.threads_per_rank >= 0, "run.threads_per_rank", self.threads_per_rank, "must be >= 0")


@dataclass
class ModelConfig:
    """The language model being pretrained."""

    #: tiny | small | 370m | 1.3b | llama3.2-1b | llama3.2-3b | llama3.1-8b (dwmtrain.models.spec.PRESETS)
    preset: str = "tiny"
    #: a Hugging Face causal-LM config (config.json, or a model directory) instead of the preset: Llama, Mistral,
    #: Qwen2, Qwen3 (dwmtrain.models.spec.SUPPORTED)
    hf_config: str = ""
    #: a Hugging Face checkpoint directory (safetensors, sharded or not) to continue pretraining from; its
    #: config.json is the model unless hf_config names another. Read when a run starts, never on a resume
    init_from: str = ""
    vocab_size: int = 0  #: 0: the model's; must equal the tokenizer's vocabulary
    max_seq_len: int = 0  #: 0: the model's context (1024 for the paper presets)
    attn_implementation: str = "sdpa"  #: sdpa (fused kernels) | eager
    #: the training loss applies the LM head this many tokens at a time, never holding the full
    #: [tokens, vocab] logits (models.loss.fused_weighted_loss); 0: the full-logits path
    loss_chunk_tokens: int = 1024
    #: recompute decoder layers' activations in the backward instead of keeping them: 0 off, 1 every layer (full),
    #: k every k-th layer (about 1/k of full's saving, and of its recompute: ~1/3 more LM compute at full)
    activation_checkpointing: int = 0

    def __post_init__(self):
        from dwmtrain.models.spec import ATTN_IMPLEMENTATIONS, PRESETS

        one_of("model.preset", self.preset, tuple(PRESETS))
        check(not self.hf_config or Path(self.hf_config).exists(), "model.hf_config", self.hf_config,
              "no such file or directory")  # fmt: skip
        # init_from may be gone by a resume (the run keeps its config.json): read, and checked, when a run starts
        check(not self.init_from or not Path(self.init_from).is_file(), "model.init_from", self.init_from,
              "must be a Hugging Face model directory")  # fmt: skip
        check(self.vocab_size >= 0, "model.vocab_size", self.vocab_size, "must be >= 0")
        check(self.max_seq_len >= 0, "model.max_seq_len", self.max_seq_len, "must be >= 0")
        one_of("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        check(self.loss_chunk_tokens >= 0, "model.loss_chunk_tokens", self.loss_chunk_tokens, "must be >= 0")
        check(self.activation_checkpointing >= 0, "model.activation_checkpointing", self.activation_checkpointing,
              "must be >= 0 (0: off, 1: every layer, k: every k-th layer)")  # fmt: skip
        if self.hf_config or Path(self.init_from or "/nonexistent").is_dir():  # the architecture, now: not after a wait
            from dwmtrain.models.spec import lm_spec

            lm_spec(self)


VALIDATION_SETS = ("lambada", "heldout", "target")  #: data.val_source, data.report_sets


@dataclass
class TargetConfig:
    """data.target: the user's target set, what the DWM is steered toward (with data.val_source=target)."""

    #: documents (JSON lines plain/.zst/.gz, parquet, arrow, a saved datasets directory, a directory of them) or a
    #: directory prepare-data wrote with the run's tokenizer
    path: str = ""
    kind: str = "auto"  #: auto (prepared if the directory has an index.json) | documents | prepared
    text_field: str = "text"  #: where a record's text is (a dotted path)

    def __post_init__(self):
        one_of("data.target.kind", self.kind, ("auto", "documents", "prepared"))


@dataclass
class SourceConfig:
    """One source of a blend (data.sources)."""

    path: str = ""  #: a directory prepare-data wrote, or a Megatron / GPT-NeoX PREFIX (of PREFIX.bin + PREFIX.idx)
    weight: float = 1.0  #: its share of the blend (weights are normalized to sum 1)
    name: str = ""  #: its domain where its data names none finer ("": the path's last part)


@dataclass
class DataConfig:
    """Prepared token shards, tokenizer and validation data."""

    #: directory written by ``dwmtrain prepare-data`` (not read when data.sources is given)
    train_data: str = "runs/data/sample"
    #: a blend of sources with proportions, each {path, weight, name}: prepared directories or Megatron/GPT-NeoX
    #: .bin/.idx prefixes, drawn in proportion to their weights (data/mixture.py); replaces train_data
    sources: list[SourceConfig] = field(default_factory=list)
    #: a resume may change data.sources (weights, sources added or dropped): the new blend applies from the resumed
    #: step, each kept source continuing where its draws stopped; RUN_DIR/data_mixture.json records every change
    change_mixture: bool = False
    #: the tokenizer the data was prepared with: a sentencepiece .model, a Hugging Face tokenizer.json or a
    #: directory AutoTokenizer loads (fast tokenizers only, no remote code)
    tokenizer: str = "runs/data/tokenizer.model"
    seq_len: int = 1024  #: packed sequence length; must equal the prepared data's
    #: what the meta job is rewarded on and validation reports, split between them: lambada (the paper) | heldout
    #: (the DWM_VAL ablation) | target (data.target, the user's own)
    val_source: str = "lambada"
    lambada_path: str = "dwmtrain:data/corpus/lambada_sample.jsonl"  #: lambada_openai-format JSONL
    target: TargetConfig = field(default_factory=TargetConfig)
    #: the share of the validation source that is the meta job's reward part (of a target's documents, of the
    #: cloze items, of the held-out sequences); in-training validation reports on the rest only (dwmtrain eval's
    #: lm-eval tasks are the full public sets: see docs/evaluation.md)
    reward_fraction: float = 0.5
    split_seed: int = 0  #: the seed of the reward / report split (recorded in RUN_DIR/validation/split.json)
    #: more sets validation reports beside val_source's report part (each whole, by name): lambada | heldout |
    #: target; a run so shows its target's gain and what it costs elsewhere
    report_sets: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  #: documents to prepare train_data from if missing (data.readers)
    text_field: str = "text"  #: where a raw record's text is (a dotted path)
    domain_field: str = "meta.redpajama_set_name"  #: where a raw record's domain is (absent: unknown)
    heldout_data: str = ""  #: val_source=heldout: prepared dir whose heldout split validates ("": train_data)
    verify: str = "size"  #: shard check at load: size (cheap) | sha256 (reads everything)

    def __post_init__(self):
        # bundled files (``dwmtrain:...``) become absolute paths into the installed package
        self.tokenizer, self.lambada_path = package_path(self.tokenizer), package_path(self.lambada_path)
        self.raw = [package_path(r) for r in self.raw]
        positive("data.seq_len", self.seq_len)
        one_of("data.val_source", self.val_source, VALIDATION_SETS)
        self.target.path = package_path(self.target.path)
        for name in self.report_sets:
            one_of("data.report_sets", name, VALIDATION_SETS)
        check(len(set(self.report_sets)) == len(self.report_sets), "data.report_sets", self.report_sets,
              "names a set twice")  # fmt: skip
        wants = "target" in (self.val_source, *self.report_sets)
        check(not wants or bool(self.target.path), "data.target.path", self.target.path,
              "data.val_source=target or a report set 'target' needs the target set's path")  # fmt: skip
        check(0.0 < self.reward_fraction < 1.0, "data.reward_fraction", self.reward_fraction,
              "must be in (0, 1): the meta job's part and the reported part each need examples")  # fmt: skip
        one_of("data.verify", self.verify, ("size", "sha256"))
        self._check_sources()

    def _check_sources(self) -> None:
        import math

        for i, src in enumerate(self.sources):
            f = f"data.sources[{i}]"
            check(bool(src.path), f"{f}.path", src.path, "names no data")
            check(math.isfinite(src.weight) and src.weight >= 0, f"{f}.weight", src.weight,
                  "must be a finite number >= 0")  # fmt: skip
            src.path = package_path(src.path)
            src.name = src.name or Path(src.path.rstrip("/")).name
        if not self.sources:
            return
        check(any(s.weight > 0 for s in self.sources), "data.sources", [s.weight for s in self.sources],
              "every weight is 0: nothing to draw")  # fmt: skip
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "data.sources", names, f"names {dup} twice: give each source its own name")
        wants_heldout = "heldout" in (self.val_source, *self.report_sets)
        check(
            not wants_heldout or bool(self.heldout_data),
            "data.heldout_data",
            self.heldout_data,
            "a blend (data.sources) has no one heldout split: name the prepared directory to validate on",
        )

    @property
    def train_name(self) -> str:
        """The training data in a message: train_data's path, or the blend's sources."""
        return self.train_data if not self.sources else "data.sources " + ", ".join(s.name for s in self.sources)


@dataclass
class DWMConfig:
    """The Data Weighting Model: backbone embeds samples, attention across the micro-batch, 2 linears."""

    #: auto: the LM's own model when the backbone starts from the LM's weights (init_backbone_from_lm: the paper's
    #: setup, whatever LM a run names), else tiny | lm | an LM preset (the paper's 370M DWM for a 1.3B LM: 370m)
    backbone: str = "auto"
    attn_heads: int = 4  #: heads of the cross-sample attention block
    head_hidden: int = 0  #: hidden width of the 2-layer head (0: backbone hidden size)
    pooling: str = "mean"  #: mean | last: how token states become one embedding per sample
    temperature: float = 1.0  #: temperature of the weights (logits / T)
    normalization: str = "softmax"  #: softmax (B * softmax(z/T)) | sigmoid (keep-gates renormalized to mean 1)
    uniform_mix: float = 0.0  #: w <- (1-u) w + u, guards against collapse onto few samples
    init_backbone_from_lm: bool = True  #: first boundary: copy the LM into the backbone (as the paper)
    #: every continued DWM (a later stage's, a warm start's) gets the LM it is fitted on copied into its backbone,
    #: its head kept: features of the current LM, not of the first boundary's (the paper copies once)
    refresh_backbone: bool = False
    #: the LM's own per-sample loss as one more input of the head (standardized over the micro-batch): a feature
    #: of the current LM, free in the training forward (the weights are applied to the losses of that forward)
    loss_feature: bool = False
    #: backbone | lm: what embeds each sample. backbone: the DWM's own transformer (the paper's); lm: the LM's own
    #: final hidden states from the very forward the weights apply to, pooled (no backbone, no extra forward: the
    #: features are the current LM's at every step; the meta job reads them from the boundary's LM)
    features: str = "backbone"
    alarm_ess: float = 0.5  #: alarm when a step's mean ESS falls below this fraction of the micro-batch (collapse)
    alarm_max_weight: float = 0.5  #: alarm when one sample's weight exceeds this fraction of the micro-batch size
    #: torch.compile the frozen DWM's forward on the trainer ranks: 0.88x its time on CPU at small, after ~30 s
    #: of compiling per process (tools/bench.py --only dwmcompile); pays on long runs, not in short tests
    compile: bool = False
    #: the dtype the trainer applies the DWM in: train (bf16 where the LM trains in bf16 or fp16, else fp32) | fp32
    #: (a forward about twice the cost in bf16 runs; where a boundary warns that its weights stray from the fitted)
    dtype: str = "train"

    def __post_init__(self):
        from dwmtrain.models.dwm import FEATURES, POOLINGS
        from dwmtrain.models.spec import PRESETS
        from dwmtrain.models.weights import NORMALIZATIONS

        one_of("dwm.features", self.features, FEATURES)
        if self.features == "lm":  # the LM's states, of the LM's width: nothing else can be the backbone
            check(self.backbone in ("auto", "lm"), "dwm.backbone", self.backbone,
                  "dwm.features=lm reads the LM's own hidden states: leave dwm.backbone at auto (or lm)")  # fmt: skip
            check(not self.refresh_backbone, "dwm.refresh_backbone", self.refresh_backbone,
                  "dwm.features=lm has no backbone to refresh: its features are always the current LM's")  # fmt: skip
            self.backbone = "lm"
        if self.backbone == "auto":
            self.backbone = "lm" if self.init_backbone_from_lm else "tiny"
        one_of("dwm.backbone", self.backbone, (*PRESETS, "lm", "auto"))
        positive("dwm.attn_heads", self.attn_heads)
        check(self.head_hidden >= 0, "dwm.head_hidden", self.head_hidden, "must be >= 0")
        one_of("dwm.pooling", self.pooling, POOLINGS)
        one_of("dwm.normalization", self.normalization, NORMALIZATIONS)
        one_of("dwm.dtype", self.dtype, ("train", "fp32"))
        positive("dwm.temperature", self.temperature)
        check(0.0 <= self.uniform_mix <= 1.0, "dwm.uniform_mix", self.uniform_mix, "must be in [0, 1]")
        check(0.0 <= self.alarm_ess <= 1.0, "dwm.alarm_ess", self.alarm_ess, "must be in [0, 1]")
        check(0.0 < self.alarm_max_weight <= 1.0, "dwm.alarm_max_weight", self.alarm_max_weight, "must be in (0, 1]")


@dataclass
class StagesConfig:
    """Training is split into stages; the DWM is refit at each boundary. Stage 1 is uniform."""

    total_steps: int = 100  #: optimizer steps of the whole run
    num_stages: int = 5  #: T; boundaries split total_steps evenly unless ``boundaries`` is given
    boundaries: list[int] = field(default_factory=list)  #: explicit start steps of stages 2..T

    def __post_init__(self):
        positive("stages.total_steps", self.total_steps)
        positive("stages.num_stages", self.num_stages)
        try:
            stage_starts(self.total_steps, self.num_stages, list(self.boundaries))
        except ValueError as e:  # name the field the user set: boundaries if given, else the stage count
            if self.boundaries:
                raise ConfigError(f"stages.boundaries={self.boundaries!r}: {e}") from None
            raise ConfigError(f"stages.num_stages={self.num_stages}: {e}") from None


@dataclass
class FixedMode:
    """meta.mode=fixed: one DWM file weighs the whole run (the paper's static DWM_w1 / DWM_w4 ablations)."""

    dwm_path: str = ""  #: a DWM file (.safetensors) used from step 0 on


@dataclass
class TransferMode:
    """meta.mode=transfer: stage K is weighed by stage K's DWM of another, finished bilevel run (the paper's
    370M -> 1.3B and random -> DSIR/QuRating transfers); stage 1 is uniform."""

    dwm_run: str = ""  #: the finished bilevel run's directory


@dataclass
class OracleMode:
    """meta.mode=oracle: the samples of some domains weighted 0 (a headroom baseline on labelled data, e.g. the noise
    probe's corrupted documents)."""

    drop: list[str] = field(default_factory=list)  #: domains weighted 0
    from_stage: int = 1  #: first stage it weighs (2: uniform stage 1, like the DWM's schedule)


@dataclass
class DomainWeightsMode:
    """meta.mode=domain_weights: each sample weighted by a fixed factor of its domain, renormalized to mean 1 per
    micro-batch (the static baseline a user tries first: the target's domain up by a factor)."""

    factors: dict[str, float] = field(default_factory=dict)  #: {domain: factor}; a domain not named: 1
    from_stage: int = 1  #: first stage it weighs

    def __post_init__(self):
        for k, v in self.factors.items():
            check(v >= 0, f"meta.domain_weights.factors.{k}", v, "must be >= 0")
        check(self.from_stage >= 1, "meta.domain_weights.from_stage", self.from_stage, "must be >= 1")


@dataclass
class LossReweightMode:
    """meta.mode=loss_reweight: each micro-batch weighed by its own losses (Sow et al., ICLR 2025): a baseline with
    no DWM and no meta job."""

    rule: str = "linupper"  #: linupper | quadratic | extremes (models.weights.LOSS_RULES)
    temperature: float = 1.0  #: tau of w ∝ exp(f(h) / tau) (their kl_reg; 1.0 theirs)
    from_step: int = -1  #: uniform weights before this step (theirs: 1,000 of 20,000); -1: 5% of the run's steps

    def __post_init__(self):
        one_of("meta.loss_reweight.rule", self.rule, ("linupper", "quadratic", "extremes"))
        positive("meta.loss_reweight.temperature", self.temperature)
        check(self.from_step >= -1, "meta.loss_reweight.from_step", self.from_step, "must be >= 0 (or -1: 5%)")


#: meta.mode: none (uniform throughout) | bilevel (the method: the meta job's settings are this section's own
#: fields) | fixed | transfer | oracle | domain_weights | loss_reweight (each with its section meta.<mode>)
META_MODES = ("none", "bilevel", "fixed", "transfer", "oracle", "domain_weights", "loss_reweight")


@dataclass
class MetaConfig:
    """How each stage is weighed: the mode, the bi-level meta job's settings (this section's own fields) and each
    other mode's section."""

    mode: str = "bilevel"  #: one of META_MODES
    fixed: FixedMode = field(default_factory=FixedMode)
    transfer: TransferMode = field(default_factory=TransferMode)
    oracle: OracleMode = field(default_factory=OracleMode)
    domain_weights: DomainWeightsMode = field(default_factory=DomainWeightsMode)
    loss_reweight: LossReweightMode = field(default_factory=LossReweightMode)
    #: a DWM that weighs stage 1 (instead of uniform) and that the first meta-update continues from: a DWM file,
    #: or a run directory (its newest stage DWM), e.g. a cheap proxy run's (a warm start)
    init_dwm: str = ""
    launch: str = "local"  #: local: rank 0 runs the meta job on this node | external: stop, run it yourself
    steps: int = 20  #: K meta-steps (Adam on the DWM) per boundary
    #: R(theta), the validation loss before the lookahead, is for the log only (an extra forward): computed at
    #: the first and last meta-step and every log_every-th
    log_every: int = 10
    lr: float = 1e-4  #: Adam learning rate of the DWM
    lookahead_lr: float = 0.0  #: alpha of the lookahead step; 0: the LM's learning rate at the boundary
    #: sgd: theta* = theta - alpha sum_i w_i grad L_i (the paper's Eq. 4) | adam: theta* is the AdamW step the engine
    #: would take from the boundary checkpoint's moments (read from its ZeRO shards through DeepSpeed's universal
    #: conversion; every process then also holds m and v: 8 B/param more, 64 GB at 8B)
    lookahead: str = "sgd"
    grad_mode: str = "fd"  #: fd (finite differences, production) | per_sample | jvp | unrolled (reference)
    #: fd mode: norm of the parameter perturbation along v = grad L_val(theta*); 0: by the LM's dtype and
    #: parameter norm (meta.metagrad.FD_EPS; fp32: max(3e-4 x the norm, 0.02), measured most accurate)
    fd_eps: float = 0.0
    val_batch_size: int = 8  #: validation examples per meta-step
    #: step: v = grad L_val(theta*) on each meta-step's validation batch (the paper's lookahead) | boundary:
    #: v = grad L_val(theta) once per boundary over the whole reward part (Eq. 5's sum); a meta-step then costs
    #: its training micro-batch's passes only. Exact as alpha -> 0 (theta* = theta); it drops theta*'s O(alpha)
    #: shift, and the step mode's v is one batch's noisy estimate of it
    v: str = "step"
    #: the dtype the meta job holds the frozen LM in: fp32 | train (the training dtype: bf16 on GPUs). Every
    #: process holds 3 LM-sized tensors at its peak: at 8B, 96 GB in fp32, 48 GB in bf16. The meta-gradient's
    #: error against fp64 is 7e-4 in fp32 and 5e-2 to 1e-1 in bf16 (tools/bench.py metaacc; docs/scaling.md)
    lm_dtype: str = "fp32"
    nproc: int = 1  #: data-parallel processes of the meta job per node (GPUs, or CPU processes)
    #: nodes the meta job spans (its world: nodes x nproc, the same DWM as one node with that many processes).
    #: More nodes make the meta-steps faster; each process still holds the whole LM. launch=local starts it with
    #: srun inside the run's SLURM allocation; launch=external: dwmtrain/launch/slurm/meta_update.sbatch --nodes=N
    nodes: int = 1
    timeout_s: int = 3600  #: training stops with a resumable checkpoint if the meta job takes longer
    backbone_trainable: bool = True  #: train the DWM backbone too (False: only attention + linears)
    normalize_grad: bool = True  #: standardize dR/dw over each micro-batch: scale-free meta-steps
    spread_penalty: float = 0.5  #: collapse guard: + spread_penalty * var(log w); in units of normalize_grad (0: off)
    calibrate_batches: int = 0  #: after fitting, shrink the DWM by its agreement with dR/dw on N unseen micro-batches
    calibrate_rho: float = 0.5  #: agreement at which the fitted DWM is kept at full strength (less: shrunk)
    #: the fitted DWM's strength chosen by the reward: its logits scaled by each of these (0: uniform weights), one
    #: short real rollout per candidate (strength_steps AdamW steps from the boundary checkpoint and its moments,
    #: the same micro-batches for all), scored on the reward part; the best is kept. []: as fitted (the paper)
    strength: list[float] = field(default_factory=list)
    strength_steps: int = 4  #: training steps in each candidate's rollout
    strength_reward_examples: int = 256  #: reward-part examples each rollout is scored on

    @property
    def uses_dwm(self) -> bool:
        """Whether a DWM weighs any stage (none, oracle, domain_weights and loss_reweight weigh without one)."""
        return self.mode in ("bilevel", "fixed", "transfer")

    def __post_init__(self):
        one_of("meta.mode", self.mode, META_MODES)
        if self.init_dwm:
            check(self.mode == "bilevel", "meta.init_dwm", self.init_dwm, "goes with meta.mode=bilevel (a warm start)")
        one_of("meta.launch", self.launch, ("local", "external"))
        one_of("meta.grad_mode", self.grad_mode, ("fd", "per_sample", "jvp", "unrolled"))
        one_of("meta.lm_dtype", self.lm_dtype, ("fp32", "train"))
        one_of("meta.v", self.v, ("step", "boundary"))
        one_of("meta.lookahead", self.lookahead, ("sgd", "adam"))
        if self.lookahead == "adam":
            check(self.grad_mode != "unrolled", "meta.lookahead", self.lookahead,
                  "the unrolled reference is the SGD lookahead's (use fd, per_sample or jvp)")  # fmt: skip
        if self.v == "boundary":
            check(self.grad_mode != "unrolled", "meta.v", self.v, "the unrolled reference takes a lookahead (step)")
        if self.mode == "fixed":
            check(bool(self.fixed.dwm_path), "meta.fixed.dwm_path", self.fixed.dwm_path, "meta.mode=fixed needs a DWM")
        if self.mode == "transfer":
            check(bool(self.transfer.dwm_run), "meta.transfer.dwm_run", self.transfer.dwm_run,
                  "meta.mode=transfer needs a finished bilevel run's directory")  # fmt: skip
        if self.mode == "oracle":
            check(bool(self.oracle.drop), "meta.oracle.drop", self.oracle.drop, "meta.mode=oracle needs domains")
        check(self.oracle.from_stage >= 1, "meta.oracle.from_stage", self.oracle.from_stage, "must be >= 1")
        if self.mode == "domain_weights":
            check(bool(self.domain_weights.factors), "meta.domain_weights.factors", self.domain_weights.factors,
                  "meta.mode=domain_weights needs {domain: factor}")  # fmt: skip
        check(self.spread_penalty >= 0, "meta.spread_penalty", self.spread_penalty, "must be >= 0")
        check(self.calibrate_batches >= 0, "meta.calibrate_batches", self.calibrate_batches, "must be >= 0")
        scales_ok = all(isinstance(s, (int, float)) and s >= 0 for s in self.strength) and len(self.strength) != 1
        check(scales_ok, "meta.strength", self.strength, "a list of two or more logit scales >= 0 (0: uniform), or []")
        positive("meta.strength_steps", self.strength_steps)
        positive("meta.strength_reward_examples", self.strength_reward_examples)
        positive("meta.calibrate_rho", self.calibrate_rho)
        check(self.fd_eps >= 0, "meta.fd_eps", self.fd_eps, "must be >= 0 (0: by the LM's dtype and norm)")
        for f in ("steps", "log_every", "lr", "val_batch_size", "nproc", "nodes", "timeout_s"):
            positive(f"meta.{f}", getattr(self, f))
        check(self.lookahead_lr >= 0, "meta.lookahead_lr", self.lookahead_lr, "must be >= 0")


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
    #: auto: DeepSpeed's FusedAdam on GPUs (a CUDA op DeepSpeed JIT-compiles once per machine, with nvcc and ninja),
    #: torch's AdamW on CPU; torch: torch.optim.AdamW everywhere (the same math, no op to compile)
    implementation: str = "auto"

    def __post_init__(self):
        positive("optimizer.lr", self.lr)
        check(self.implementation in ("auto", "torch"), "optimizer.implementation", self.implementation,
              "must be auto or torch")  # fmt: skip
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        positive("optimizer.eps", self.eps)
        check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "must be >= 0")


@dataclass
class DeepSpeedConfig:
    """Batch arithmetic and ZeRO settings; the only place batch sizes are written."""

    template: str = "zero3"  #: zero3 | a path to a JSON template (the ZeRO knobs below are not set there)
    micro_batch_size: int = 8  #: sequences per rank per forward (the DWM scores these together)
    global_batch_size: int = 0  #: sequences per optimizer step (0: from global_batch_tokens or accum)
    global_batch_tokens: int = 0  #: tokens per optimizer step (the paper: 4M = 4096 x 1024)
    gradient_accumulation_steps: int = 0  #: 0: derived from the global batch and world size
    precision: str = "auto"  #: auto (bf16 on GPU, fp32 on CPU) | bf16 (also on CPU: CI's check of it) | fp16 | fp32
    #: 1 | 2 | 3: what ZeRO shards over the data-parallel ranks (1: the optimizer states, 2: and the gradients,
    #: 3: and the parameters); tensor parallelism needs 1 or 2
    zero_stage: int = 3
    #: Megatron-style tensor parallelism (DeepSpeed AutoTP) over this many consecutive ranks (within a node):
    #: each attention and MLP matrix split across them; with ZeRO stage 1 or 2 (AutoTP training's), docs/scaling.md
    tensor_parallel_size: int = 1
    # ZeRO-3's knobs at scale (written into zero_optimization; docs/scaling.md says what each trades)
    #: parameters gathered ahead of use (stage3_prefetch_bucket_size): more overlaps communication with compute,
    #: costs that many elements of GPU memory in the training dtype
    prefetch_bucket_size: int = 50_000_000
    #: parameters this small stay whole on every rank (stage3_param_persistence_threshold): no gather for norms and
    #: biases, at their full size on every rank
    param_persistence_threshold: int = 100_000
    #: gradient elements reduce-scattered at once (reduce_bucket_size): bigger is fewer, larger messages and a
    #: bigger buffer
    reduce_bucket_size: int = 50_000_000
    #: most gathered parameters alive at once per rank (stage3_max_live_parameters): caps the gather's memory
    max_live_parameters: int = 1_000_000_000
    #: none | cpu: Adam's states (12 bytes/parameter with the fp32 master) in pinned host memory, stepped on the
    #: CPU (DeepSpeedCPUAdam): frees most of a GPU's model states, costs PCIe traffic and host cores per step
    offload_optimizer: str = "none"
    #: none | cpu: the parameter partitions in host memory too, gathered over PCIe for each use (slowest; with
    #: offload_optimizer=cpu only)
    offload_params: str = "none"

    def __post_init__(self):
        positive("deepspeed.micro_batch_size", self.micro_batch_size)
        for f in ("global_batch_size", "global_batch_tokens", "gradient_accumulation_steps"):
            check(getattr(self, f) >= 0, f"deepspeed.{f}", getattr(self, f), "must be >= 0")
        one_of("deepspeed.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        check(self.template != "zero3_offload", "deepspeed.template", self.template,
              "is gone: set deepspeed.offload_optimizer=cpu and deepspeed.offload_params=cpu")  # fmt: skip
        if self.template != "zero3":
            check(Path(self.template).is_file(), "deepspeed.template", self.template, "no such template")
        for f in ("prefetch_bucket_size", "reduce_bucket_size", "max_live_parameters"):
            positive(f"deepspeed.{f}", getattr(self, f))
        check(self.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
              self.param_persistence_threshold, "must be >= 0")  # fmt: skip
        positive("deepspeed.tensor_parallel_size", self.tensor_parallel_size)
        one_of("deepspeed.zero_stage", self.zero_stage, (1, 2, 3))
        check(self.tensor_parallel_size == 1 or self.zero_stage < 3, "deepspeed.zero_stage", self.zero_stage,
              f"with deepspeed.tensor_parallel_size={self.tensor_parallel_size}: DeepSpeed's AutoTP training runs "
              "with ZeRO stage 1 or 2; set deepspeed.zero_stage=1")  # fmt: skip
        check(self.offload_params == "none" or self.zero_stage == 3, "deepspeed.offload_params", self.offload_params,
              f"needs deepspeed.zero_stage=3 (only it partitions parameters), not {self.zero_stage}")  # fmt: skip
        one_of("deepspeed.offload_optimizer", self.offload_optimizer, ("none", "cpu"))
        one_of("deepspeed.offload_params", self.offload_params, ("none", "cpu"))
        check(self.offload_params == "none" or self.offload_optimizer == "cpu", "deepspeed.offload_params",
              self.offload_params, "needs deepspeed.offload_optimizer=cpu")  # fmt: skip


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
        mb = self.deepspeed.micro_batch_size
        check(self.meta.mode == "none" or mb >= 2, "deepspeed.micro_batch_size", mb,
              f"meta.mode={self.meta.mode} weighs the samples of a micro-batch against each other (its weights have "
              "mean 1 over it): one sample's weight is always 1 and the run would train uniform; use >= 2 (the "
              "paper: 8), or meta.mode=none")  # fmt: skip
        if self.model.max_seq_len:
            check(
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
