"""``dwmtrain score`` and ``dwmtrain analyze-preferences``: registered on the main parser by ``register(sub)``.

Kept free of heavy imports (torch, matplotlib): every ``dwmtrain`` command builds the whole parser.
"""

from __future__ import annotations

import sys
import time


def _score(a) -> None:
    from dwmtrain.analysis import score_parts as sp
    from dwmtrain.analysis.preferences import open_split
    from dwmtrain.analysis.scoring import check_out_suffix, choose_samples, score_summary, write_records
    from dwmtrain.api import DWM
    from dwmtrain.arrays import parse_part
    from dwmtrain.checkpoint.dwm_file import check_dwm_micro_batch, check_dwm_tokenizer
    from dwmtrain.errors import DataError

    check_out_suffix(a.out)  # before any work: the suffix picks the format
    if a.part and a.merge:
        raise DataError("--part and --merge: one or the other (the parts first, then one merge)")
    loaded = DWM.load(a.dwm)  # the API's load: checksum, architecture, tensors
    dwm, meta = loaded.model, loaded.meta
    check_dwm_micro_batch(meta, a.dwm, a.micro_batch, "--micro-batch")
    ds = open_split(a.data, a.split)
    if dwm.arch.vocab_size != ds.vocab_size:
        raise DataError(
            f"{a.data}: prepared with a {ds.vocab_size}-piece vocabulary, DWM {a.dwm} has {dwm.arch.vocab_size}"
        )
    check_dwm_tokenizer(meta, a.dwm, ds.index.get("tokenizer", "?"), ds.index.get("tokenizer_sha256", ""))
    idx, notes = choose_samples(len(ds), a.samples, a.seed, a.micro_batch, a.shuffle)
    for note in notes if not a.part else ():
        print(f"note: {note}")
    stage = f" (stage {meta['stage']})" if meta.get("stage") is not None else ""
    scoring = sp.Scoring.of(dwm=a.dwm, data=a.data, split=a.split, samples=idx, micro_batch=a.micro_batch,
                            device=a.device, rater=a.rater, rater_labels=a.rater_labels,
                            rater_max_length=a.rater_max_length)  # fmt: skip
    if a.merge:
        recs = sp.merged_records(a.out, scoring)
        print(f"merged {len(recs)} scored {a.split} samples of {a.data} ({a.dwm}{stage}) from the parts")
    elif a.part:
        i, n = parse_part(a.part)
        if sp.job_array(a.out).holds(i, n, scoring.marker(i, n)):
            print(f"part {i}/{n} is complete ({sp.job_array(a.out).part(i, n)}): skipped")
            return
        lo, hi = sp.micro_batch_range(len(idx), a.micro_batch, i, n)
        t0 = time.time()
        recs = _score_samples(a, dwm, ds, idx[lo:hi], lo // a.micro_batch)
        dest = sp.write_part(a.out, i, n, scoring, recs)
        dt = time.time() - t0
        print(f"part {i}/{n}: scored samples {lo}..{hi - 1} in {dt:.1f} s ({len(recs) / max(dt, 1e-9):,.1f} "
              f"samples/s) -> {dest}")  # fmt: skip
        return
    else:
        recs = _score_samples(a, dwm, ds, idx, 0)
        print(f"scored {len(recs)} {a.split} samples of {a.data} with {a.dwm}{stage}")
    path = write_records(recs, a.out)
    print(score_summary(recs))
    print(f"wrote {path}")


def _score_samples(a, dwm, ds, idx, first_micro_batch: int) -> list[dict]:
    """The records of samples ``idx`` (micro-batches numbered from ``first_micro_batch``), rated with --rater."""
    from dwmtrain.analysis.scoring import quality_scores, resolve_device, sample_texts, score_dataset, score_records

    dev, dtype = resolve_device(a.device)
    print(f"scoring {len(idx)} samples on {dev} ({str(dtype)[6:]})", flush=True)
    w, z = score_dataset(dwm, ds, idx, a.micro_batch, dev, dtype, with_logits=True, progress=sys.stderr.isatty())
    quality = {}
    if a.rater:
        texts = sample_texts(ds, idx, a.tokenizer)
        quality = quality_scores(texts, a.rater, dev, rater_names(a), a.rater_max_length)
    recs = score_records(idx, w, z, ds, a.micro_batch, quality)
    for r in recs:
        r["micro_batch"] += first_micro_batch
    return recs


def _analyze(a) -> None:
    from dwmtrain.analysis.preferences import PreferenceRequest, analyze_preferences
    from dwmtrain.analysis.summary import summary_text

    req = PreferenceRequest(a.run_dir, samples=a.samples, split=a.split, data=a.data, out=a.out, seed=a.seed,
                            device=a.device, split_by=a.split_by, rater=a.rater, rater_labels=rater_names(a),
                            rater_max_length=a.rater_max_length)  # fmt: skip
    report = analyze_preferences(req, progress=sys.stderr.isatty(), log=lambda m: print(m, flush=True))
    print(summary_text(report))
    for p in report["files"].values():
        print(f"wrote {p}")


def rater_names(a) -> list[str] | None:
    return [x.strip() for x in a.rater_labels.split(",")] if a.rater_labels else None


def add_rater_options(p) -> None:
    p.add_argument(
        "--rater", default=None, metavar="DIR",
        help="also rate each sample's text with a local sequence-classification model (e.g. a QuRater copied "
        "from the hub once): one quality field per label",
    )  # fmt: skip
    p.add_argument(
        "--rater-labels", default="",
        help="names for the rater's labels, comma-separated (default: its id2label), e.g. "
        "writing_style,required_expertise,facts_and_trivia,educational_value",
    )  # fmt: skip
    p.add_argument("--rater-max-length", type=int, default=512, help="rater: tokens per text (truncated)")


def register(sub) -> None:
    """Add ``score`` and ``analyze-preferences`` to the subparsers ``sub`` of the ``dwmtrain`` parser."""
    p = sub.add_parser(
        "score",
        help="weigh samples with one DWM exactly as training does; per-sample records to JSONL or Parquet",
        description="Scores micro-batches of consecutive chosen samples (no grad, eval mode; bf16 on GPU, fp32 "
        "on CPU) and writes {index, micro_batch, weight, logit, domain} per sample. Weights have mean 1 within "
        "each micro-batch, so compare them within one; the logit is the DWM's raw score before that softmax.",
    )
    p.add_argument("--dwm", required=True, help="a DWM file (RUN_DIR/dwm/stageK.safetensors)")
    p.add_argument("--data", required=True, help="a directory written by `dwmtrain prepare-data`")
    p.add_argument("--split", default="train", choices=("train", "heldout"))
    p.add_argument(
        "--samples", type=int, default=0, help="score a seeded random choice of N samples (default: all, in order)"
    )
    p.add_argument("--shuffle", action="store_true", help="with all samples: seeded random order, as training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=8, help="samples the DWM weighs together (training's: 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True, help="FILE.jsonl or FILE.parquet")
    add_rater_options(p)
    p.add_argument("--tokenizer", default=None, help="--rater: decode samples with this tokenizer (a sentencepiece "
                   ".model, a tokenizer.json or its directory; default: the data's index.json names it)")  # fmt: skip
    p.add_argument("--part", default="", help="I/N: score part I (from 0) of N of the micro-batches into "
                   "FILE.parts/ (a job array's task, one GPU each); a complete part is skipped")  # fmt: skip
    p.add_argument("--merge", action="store_true", help="write every part's records to OUT in order: what one "
                   "score writes; refuses a missing part, naming it")  # fmt: skip
    p.set_defaults(fn=_score)

    p = sub.add_parser(
        "analyze-preferences",
        help="which data each stage's DWM prefers: domain shares, weight histograms, inter-stage rank correlation",
        description="Scores the same samples (same micro-batches) with every stage DWM of RUN_DIR and writes "
        "domains.png, weights_hist.png, rank_correlation.png, preferences.json and summary.txt into OUT "
        "(and quality.png, Figure 3's panels, with --rater). "
        "Preferred: weight > 1 in its micro-batch (--split-by logit: raw logit above the median).",
    )
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=4096, help="samples to score (rounded down to micro-batches)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"))
    p.add_argument("--data", default=None, help="prepared data directory (default: the run's data.train_data)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--split-by", default="weight", choices=("weight", "logit"), help="preferred/unpreferred rule")
    add_rater_options(p)
    p.set_defaults(fn=_analyze)
