"""``dwmtrain select {random,dsir,qurating}``: write an offline-selected subset of SlimPajama JSONL."""

from __future__ import annotations

import argparse
import functools

from dwmtrain.data.readers import add_field_options

USAGE = """\
dwmtrain select random   --input IN... --out OUT.jsonl[.zst] (--budget-docs N | --budget-tokens N --tokenizer SP)
dwmtrain select dsir     --input IN... --out OUT (--target-domains a,b | --target-file F...) BUDGET
dwmtrain select qurating --input IN... --out OUT (--score-field meta.quality.x | --rater DIR) BUDGET [--temperature T]
On a cluster: the same command with --part I/N in each task of a job array, then once with --merge
(dwmtrain/launch/slurm/select_array.sh submits both); dwmtrain data-status OUT shows the parts.
"""


def _split_list(s: str) -> list[str]:
    return [x for x in (p.strip() for p in s.split(",")) if x]


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s}: must be a positive integer")
    return v


def _run(a) -> None:
    from dwmtrain.data.readers import fields_of
    from dwmtrain.errors import DataError
    from dwmtrain.select.driver import select
    from dwmtrain.select.output import report_path
    from dwmtrain.select.report import summary

    opts: dict = {}
    if a.method == "dsir":
        opts = dict(
            target_domains=_split_list(a.target_domains) if a.target_domains else None,
            target_files=a.target_file,
            num_buckets=a.num_buckets,
            smoothing=a.smoothing,
        )
    elif a.method == "qurating":
        opts = dict(
            score_field=a.score_field,
            rater=a.rater,
            rater_label=a.rater_label,
            rater_max_length=a.rater_max_length,
            rater_batch_size=a.rater_batch_size,
            rater_device=a.rater_device,
            temperature=a.temperature,
            normalize=a.normalize,
            missing=a.missing,
        )
    if a.part and a.merge:
        raise DataError("--part and --merge: one or the other (the parts first, then one merge)")
    if a.part:
        from dwmtrain.select.parts import select_part

        print(select_part(a.method, a.input, a.out, a.part, tokenizer=a.tokenizer, progress=not a.no_progress,
                          fields=fields_of(a), **opts))  # fmt: skip
        return
    from dwmtrain.select.parts import merge_selection

    run = merge_selection if a.merge else functools.partial(select, progress=not a.no_progress)
    report = run(
        a.method,
        a.input,
        a.out,
        budget_tokens=a.budget_tokens,
        budget_docs=a.budget_docs,
        tokenizer=a.tokenizer,
        seed=a.seed,
        overwrite=a.overwrite,
        fields=fields_of(a),
        shard_docs=a.shard_docs,
        **opts,
    )
    print(summary(report))
    outs = report["outputs"]
    print(f"wrote {a.out}" if len(outs) == 1 and outs[0] == a.out else f"wrote {len(outs)} shards: {outs[0]} ...")
    print(f"wrote {report_path(a.out)}")


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument(
        "--input", nargs="+", required=True, help="JSONL(.zst/.gz), Parquet, Arrow files, saved datasets, dirs"
    )
    c.add_argument("--out", required=True, help="output .jsonl or .jsonl.zst (report: NAME.report.json beside it)")
    b = c.add_mutually_exclusive_group()  # required but by --part (select.driver.check_budget)
    b.add_argument("--budget-tokens", type=_positive, help="select until this many tokens (needs --tokenizer)")
    b.add_argument("--budget-docs", type=_positive, help="select this many documents")
    c.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer counting tokens (with each document's EOS, and BOS where it has one); needed by "
        "--budget-tokens",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace OUT, only once the new output is complete")
    c.add_argument("--shard-docs", type=int, default=0, help="write NAME-00000.jsonl[.zst], ... of this many "
                   "documents each instead of one file (prepare-data --part splits a pool by file)")  # fmt: skip
    c.add_argument("--part", default="", help="I/N: scan part I (from 0) of N of the input files into "
                   "NAME.parts/ (a job array's task: $SLURM_ARRAY_TASK_ID/N; no budget needed); DSIR's parts run "
                   "twice (scan, then weights); a complete part is skipped")  # fmt: skip
    c.add_argument("--merge", action="store_true", help="rank the whole pool from its parts, cut at the budget, "
                   "write OUT: what one select of the inputs writes; refuses a missing part, naming it")  # fmt: skip
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_field_options(c)
    return c


def register(sub) -> argparse.ArgumentParser:
    """Add the ``select`` subcommand to the subparsers object of ``dwmtrain``'s parser."""
    common = _common()
    p = sub.add_parser(
        "select",
        help="offline data selection baselines: random, DSIR, QuRating -> SlimPajama JSONL",
        description=__doc__ + "\n\n" + USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_subparsers(dest="method", required=True, metavar="{random,dsir,qurating}")

    m.add_parser("random", parents=[common], help="seeded uniform subset in shuffled order")

    d = m.add_parser("dsir", parents=[common], help="importance resampling on hashed n-grams (Xie et al. 2023)")
    t = d.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-domains", help="comma-separated meta.redpajama_set_name values of the pool (the target)")
    t.add_argument("--target-file", nargs="+", help="JSONL files/dirs whose records are the target")
    d.add_argument("--num-buckets", type=_positive, default=10000, help="hash buckets of the n-gram features")
    d.add_argument("--smoothing", type=float, default=1.0, help="additive smoothing of both distributions")

    q = m.add_parser("qurating", parents=[common], help="sample ∝ exp(quality / τ) (Wettig et al. 2024)")
    s = q.add_mutually_exclusive_group(required=True)
    s.add_argument("--score-field", help="dotted path of a numeric score in each record, e.g. meta.quality.x")
    s.add_argument("--rater", help="local Hugging Face sequence-classification model directory")
    q.add_argument("--rater-label", type=int, default=None, help="which logit is the score (multi-label raters)")
    q.add_argument("--rater-max-length", type=_positive, default=512, help="truncate documents to this many tokens")
    q.add_argument("--rater-batch-size", type=_positive, default=16)
    q.add_argument("--rater-device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    q.add_argument("--temperature", type=float, default=2.0, help="τ of exp(score/τ); 0 = deterministic top-k")
    q.add_argument("--normalize", action="store_true", help="z-score the scores over the pool before τ")
    q.add_argument("--missing", choices=("error", "skip"), default="error", help="a record without a numeric score")

    p.set_defaults(fn=_run)
    return p
