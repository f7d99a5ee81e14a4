"""The ``dwmtrain`` command: data, tokenizer, model and config utilities, and launch helpers."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

from dwmtrain.data.readers import add_field_options


def _describe_model(a) -> None:
    from dwmtrain.models.spec import ModelSpec

    print(ModelSpec.from_preset(a.preset, a.vocab_size).describe())


def _train_tokenizer(a) -> None:
    from dwmtrain.data.hf_tokenizer import train_hf_tokenizer
    from dwmtrain.data.readers import fields_of, iter_texts
    from dwmtrain.data.sentencepiece_tokenizer import train_tokenizer

    skipped: Counter = Counter()
    train = train_hf_tokenizer if a.kind == "hf" else train_tokenizer
    with tempfile.TemporaryDirectory() as cache:
        path = train(iter_texts(a.input, cache, skipped, fields_of(a)), a.out, a.vocab_size)
    print(f"wrote {path} (vocab {a.vocab_size})")
    print("skipped records: " + (", ".join(f"{k}: {v}" for k, v in skipped.items()) or "0"))
    if a.hf_out:
        from dwmtrain.data.tokenizer import load_tokenizer

        print(f"wrote {load_tokenizer(path).export_hf(a.hf_out)}")


def _export_tokenizer(a) -> None:
    from dwmtrain.data.tokenizer import load_tokenizer

    print(f"wrote {load_tokenizer(a.model).export_hf(a.out)}")


def _data_status(a) -> None:
    from dwmtrain.data.parts import part_status
    from dwmtrain.select.output import OUT_SUFFIXES
    from dwmtrain.select.parts import selection_status

    print("\n".join(selection_status(a.out) if a.out.endswith(OUT_SUFFIXES) else part_status(a.out)))


def _prepare_data(a) -> None:
    from dwmtrain.data.parts import merge_parts, prepare_part
    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.readers import fields_of, read_sources_file
    from dwmtrain.errors import ConfigError

    if bool(a.input) == bool(a.sources):
        raise ConfigError("prepare-data: give --input (one set of fields for all) or --sources FILE (each its own)")
    if a.sources:
        a.input = read_sources_file(a.sources)
    if a.part:
        print(prepare_part(a.input, a.tokenizer, a.out, a.part, a.workers, fields_of(a)), flush=True)
        return
    options = dict(seq_len=a.seq_len, heldout_fraction=a.heldout_fraction, shard_sequences=a.shard_sequences,
                   seed=a.seed, overwrite=a.overwrite, fields=fields_of(a))  # fmt: skip
    if a.merge:
        report = merge_parts(a.input, a.tokenizer, a.out, **options)
    else:
        report = prepare_data(a.input, a.tokenizer, a.out, workers=a.workers, **options)
    print(report.summary())
    print(f"wrote {a.out}")


def _config(a) -> None:
    import yaml

    from dwmtrain.config import ConfigError, load_config
    from dwmtrain.launch.pretrain import run_config

    cfg = run_config(a) if not a.get else load_config(a.config, a.overrides)
    if a.get:  # one resolved value, for scripts (the SLURM scripts): a section as YAML, a value as itself
        node = cfg.to_dict()
        for part in a.get.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--get {a.get}: no such field")
            node = node[part]
        print(yaml.safe_dump(node, sort_keys=False).rstrip() if isinstance(node, (dict, list)) else node)
        return
    print(cfg.to_yaml(), end="")


def train_command(a) -> list[str]:
    """The DeepSpeed launcher command that runs ``dwmtrain.launch.pretrain`` on every rank."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if a.hostfile:
        cmd += ["--hostfile", a.hostfile]
    elif a.nproc:
        cmd += ["--num_gpus", str(a.nproc)]
    if a.master_port:
        cmd += ["--master_port", str(a.master_port)]
    run = (["--config", a.config] if a.config else []) + (["--run-dir", a.run_dir] if a.run_dir else [])
    return [*cmd, "--module", "dwmtrain.launch.pretrain", *run, *a.overrides]


#: CPU ranks: glibc gives tensors above 128 KiB their own pages, returned when freed. By default it raises that
#: threshold to the largest block freed so far (up to 32 MiB), after which every step's activations stay resident:
#: a step's peak at the small preset was 1.8x what its tensors need (docs/scaling.md). Read at process start only.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _train(a) -> None:
    from dwmtrain.launch.pretrain import Hardware, dry_run, run_config

    cfg = run_config(a)  # a config that does not load is said here, before any launch
    if a.dry_run:  # one process, nothing launched
        dry_run(cfg, Hardware(a.nodes, a.gpus_per_node or a.nproc or 1, a.gpu))
        return
    if not _cuda():
        for k, v in CPU_MALLOC_ENV.items():
            os.environ.setdefault(k, v)
    cmd = train_command(a)
    print("$ " + " ".join(cmd), flush=True)
    if not a.print_only:
        os.execv(cmd[0], cmd)  # the launcher replaces this process: its exit code is the job's


def _configs(a) -> None:
    from dwmtrain.config import CONFIG_DIR, bundled_configs

    names = bundled_configs()
    width = max(map(len, names))
    for name in names:
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<{width}}  {first}")


def _export(a) -> None:
    from dwmtrain.export import export_checkpoint

    info = export_checkpoint(a.run_dir, a.out, a.checkpoint, a.dtype, a.overwrite)
    print(f"wrote {a.out}: {info['checkpoint']} (step {info['step']}, stage {info['stage']}) of {info['run_dir']}")


def _eval(a) -> None:
    from dwmtrain.eval.runs import evaluate_runs
    from dwmtrain.eval.tables import COLUMNS, compare

    labels = a.labels.split(",") if a.labels else [os.path.basename(os.path.normpath(r)) for r in a.run_dirs]
    if len(labels) != len(a.run_dirs) or len(set(labels)) != len(labels):
        from dwmtrain.errors import ConfigError

        raise ConfigError(f"--labels {a.labels!r}: need {len(a.run_dirs)} distinct labels, one per run")
    try:
        shots = tuple(int(k) for k in a.shots.split(","))
    except ValueError:
        from dwmtrain.errors import ConfigError

        raise ConfigError(f"--shots {a.shots!r}: expected comma-separated integers (the paper: 0,2)") from None
    tasks = a.tasks.split(",") if a.tasks else list(COLUMNS)
    devices = eval_devices(a.device)
    results = dict(zip(labels, evaluate_runs(
        a.run_dirs, a.task_data, shots=shots, tasks=tasks, lambada=not a.no_lambada, checkpoint=a.checkpoint or None,
        limit=a.limit, batch_size=a.batch_size, devices=devices,
        dtype="bfloat16" if devices[0].startswith("cuda") else "float32",
    )))  # fmt: skip
    from dwmtrain.rundir import RunDir

    out = a.out or (RunDir(a.run_dirs[0]).lm_eval_dir if len(a.run_dirs) == 1 else "eval-" + "-vs-".join(labels))
    for what, path in compare(results, out, shots, tasks).items():
        print(f"wrote {path} ({what})")
    print(open(os.path.join(out, "results.md")).read())


def _plan(a) -> None:
    from dwmtrain.config import load_config
    from dwmtrain.plan import make_plan, parse_device, print_plan

    cfg = load_config(a.config, a.overrides)
    print_plan(make_plan(cfg, a.nodes, a.gpus_per_node, parse_device(a.gpu, a.gpus_per_node), a.mfu))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def eval_devices(spec: str) -> list[str]:
    """``--device``: auto (every GPU of the node, else the CPU), cpu, cuda, cuda:N, or a comma-separated list."""
    import torch

    if spec == "auto":
        return [f"cuda:{k}" for k in range(torch.cuda.device_count())] or ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            from dwmtrain.errors import ConfigError

            raise ConfigError(f"--device {spec}: {d!r} is not cpu, cuda or cuda:N")
        if d.startswith("cuda") and not torch.cuda.is_available():
            from dwmtrain.errors import ConfigError

            raise ConfigError(f"--device {spec}: no CUDA device available")
        if d.startswith("cuda:") and int(d[5:]) >= torch.cuda.device_count():
            from dwmtrain.errors import ConfigError

            raise ConfigError(f"--device {spec}: {d}: this node has {torch.cuda.device_count()} visible GPUs")
    if len({d.split(":")[0] for d in devices}) > 1:
        from dwmtrain.errors import ConfigError

        raise ConfigError(f"--device {spec}: GPUs and the CPU mixed (their dtypes differ): one kind of device")
    return devices or ["cpu"]


def _report(a) -> None:
    from dwmtrain.report import summarize

    print(summarize(a.run_dir))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dwmtrain", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_data_commands(sub)
    add_run_commands(sub)
    add_eval_command(sub)
    from dwmtrain.select.cli import register as register_select

    register_select(sub)
    from dwmtrain.analysis.cli import register as register_analysis

    register_analysis(sub)
    from dwmtrain.integrations.cli import register as register_fit

    register_fit(sub)
    return ap


def add_data_commands(sub) -> None:
    """describe-model, train-tokenizer, export-tokenizer, prepare-data."""
    p = sub.add_parser("describe-model", help="print a preset's architecture and parameter count")
    p.add_argument("preset")
    p.add_argument("--vocab-size", type=int, default=0)
    p.set_defaults(fn=_describe_model)

    p = sub.add_parser("train-tokenizer", help="train a tokenizer on documents: sentencepiece BPE or byte-level BPE")
    p.add_argument("--input", nargs="+", required=True, help="document files or directories (data.readers formats)")
    p.add_argument("--out", required=True, help="sp: model prefix (writes PREFIX.model); hf: a tokenizer directory")
    p.add_argument("--kind", default="sp", choices=("sp", "hf"),
                   help="sp: sentencepiece BPE with byte fallback and Llama 2's ids; hf: a byte-level BPE "
                   "tokenizer.json (tokenizers) with Llama 3's special tokens")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hf-out", default="", help="sp: also export a Hugging Face tokenizer directory here")
    add_field_options(p)
    p.set_defaults(fn=_train_tokenizer)

    p = sub.add_parser("export-tokenizer", help="export a sentencepiece model as a Hugging Face tokenizer")
    p.add_argument("model")
    p.add_argument("out")
    p.set_defaults(fn=_export_tokenizer)

    p = sub.add_parser(
        "prepare-data", help="tokenize + pack documents (JSONL, Parquet, Arrow, saved datasets) into shards"
    )
    p.add_argument(
        "--sources",
        default="",
        help="a YAML list of {input, text_field, domain_field, domain}: inputs "
        "whose records keep their text and domain in their own fields, or a domain name for all of them",
    )
    p.add_argument("--input", nargs="+", default=[], help="files and directories (searched recursively): JSON "
                   "lines (.jsonl, .jsonl.zst, .jsonl.gz), Parquet, Arrow, a saved datasets directory")  # fmt: skip
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: the CPUs the scheduler gave this)")
    p.add_argument("--heldout-fraction", type=float, default=0.01)
    p.add_argument("--shard-sequences", type=int, default=65536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT, only once the new output is complete")
    p.add_argument("--part", default="", help="I/N: tokenize part I (from 0) of N of the inputs into OUT.parts/ "
                   "(a job array's task: $SLURM_ARRAY_TASK_ID/N); a complete part is skipped")  # fmt: skip
    p.add_argument("--merge", action="store_true", help="pack every part's documents into OUT: the dataset one "
                   "prepare-data of the inputs writes; refuses a missing part, naming it")  # fmt: skip
    add_field_options(p)
    p.set_defaults(fn=_prepare_data)

    p = sub.add_parser("data-status", help="which parts of a prepare-data or select job array are done")
    p.add_argument("out", help="the --out of the array's prepare-data or select (OUT.jsonl[.zst])")
    p.set_defaults(fn=_data_status)


def add_run_commands(sub) -> None:
    """train, configs, config, report, export."""
    from dwmtrain.launch.pretrain import add_run_options

    p = sub.add_parser(
        "train",
        help="launch pretraining with DeepSpeed (prints, then runs, the deepspeed command)",
        description="dwmtrain train [--nproc N | --hostfile H] --config C --run-dir D [k=v ...]: every rank runs "
        "dwmtrain.launch.pretrain; rerunning the same command resumes. --dry-run checks and prints in this one "
        "process and launches nothing.",
    )
    p.add_argument("--nproc", type=int, default=0, help="ranks on this machine (GPUs, or CPU processes)")
    p.add_argument("--hostfile", default="", help="DeepSpeed hostfile for several nodes (pdsh over ssh)")
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--print-only", action="store_true", help="print the command, do not run it")
    add_run_options(p)
    p.set_defaults(fn=_train)

    p = sub.add_parser(
        "plan", help="before launch: memory per GPU, the meta job's, checkpoints and disk, time per stage; fits?"
    )
    p.add_argument("--config", required=True, help="YAML run config, or a bundled config's name")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help="h100 (SXM5) | h100-pcie | h200 | a100 | cpu | a memory size (80GiB)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the time estimate")
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    p.set_defaults(fn=_plan)

    p = sub.add_parser("configs", help="list the bundled configs (usable as --config NAME)")
    p.set_defaults(fn=_configs)

    p = sub.add_parser("config", help="print the resolved config (YAML + overrides)")
    p.add_argument("--config", help="YAML run config, or a bundled config's name (default: the defaults)")
    p.add_argument("--run-dir", help="sets run.run_dir")
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    p.add_argument("--get", default="", help="print one resolved field (e.g. stages.num_stages)")
    p.set_defaults(fn=_config)

    p = sub.add_parser("report", help="summarize a run: per-stage validation, weights, meta-updates, files")
    p.add_argument("run_dir")
    p.set_defaults(fn=_report)

    p = sub.add_parser("export", help="a checkpoint as a Hugging Face model directory (weights, config, tokenizer)")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="", help="tag (step0000100) or step number; default: the newest")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--overwrite", action="store_true", help="replace OUT, only once the new export is complete")
    p.set_defaults(fn=_export)


def add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="lm-eval on every stage-end checkpoint of one or more runs (9 tasks 0/2-shot + LAMBADA), cached; "
        "tables + Figure 2",
        description="dwmtrain eval RUN_A [RUN_B ...] --task-data DIR: exports each stage-end checkpoint, runs "
        "lm-evaluation-harness offline on the local task files (docs/evaluation.md), caches the results in "
        "RUN/lm_eval/, and writes results.md, results.json and figure2.png (one row per run and stage).",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--task-data", required=True, help="local task files: DIR/<task>/<split>.jsonl")
    p.add_argument("--labels", default="", help="comma-separated names of the runs in the tables (RANDOM,RANDOM+DWM)")
    p.add_argument("--checkpoint", default="", help="evaluate this one checkpoint (tag or step) instead")
    p.add_argument("--shots", default="0,2", help="few-shot settings (the paper: 0,2)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (default: the paper's 9)")
    p.add_argument("--no-lambada", action="store_true", help="skip LAMBADA (evaluated zero-shot by default)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (a quick look; not the paper's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (every GPU of the node: one lm-eval process per GPU; else "
                   "the CPU) | cpu | cuda | cuda:N | a comma-separated list (cuda:0,cuda:1)")  # fmt: skip
    p.add_argument("--out", default="", help="tables and figure (default: RUN/lm_eval, or eval-A-vs-B for several)")
    p.set_defaults(fn=_eval)


def main(argv: list[str] | None = None) -> int:
    from dwmtrain.entry import run_main

    a = build_parser().parse_args(argv)
    return run_main(f"dwmtrain {a.cmd}:", lambda: a.fn(a))


def run() -> None:
    """The ``dwmtrain`` console script: ``main``, ended through ``entry.exit_process``."""
    from dwmtrain.entry import main_entry

    main_entry(main)


if __name__ == "__main__":
    run()
