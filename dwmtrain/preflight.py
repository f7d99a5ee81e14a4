"""Check what a config points at before any process group, GPU or hour is spent (``--dry-run`` and the
start of every run): each problem is one line naming the field and the path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dwmtrain.config import Config
from dwmtrain.errors import ConfigError


def check_inputs(cfg: Config, deep: bool = False) -> None:
    """Raise ConfigError listing every missing or unusable input the config names; ``deep`` (``--dry-run``): also
    read, tokenize and split the validation source (at a run's start the trainer does that once, on rank 0)."""
    from dwmtrain.rundir import RunDir

    pinned = RunDir(cfg.run.run_dir).model_config  # a model.init_from run's own copy of the model's config
    if cfg.model.init_from and not cfg.model.hf_config and pinned.is_file():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=str(pinned)))
    from dwmtrain.stages.modes import mode_of

    problems = data_problems(cfg, deep) + mode_of(cfg).problems(cfg)  # and what the weighting mode reads
    if problems:
        raise ConfigError("; ".join(problems))


def data_problems(cfg: Config, deep: bool = False) -> list[str]:
    """The prepared data (or the raw documents to prepare it from), the tokenizer and the validation source."""
    problems = []
    d = cfg.data
    train_index = Path(d.train_data) / "index.json"
    if d.sources:
        problems += source_problems(cfg)
    elif _looks_like_a_blend(d.train_data):
        problems.append(f"data.train_data={d.train_data!r}: a Megatron-style blend is not a path: write it as "
                        "data.sources=[{path: A, weight: 0.6}, {path: B, weight: 0.4}]")  # fmt: skip
    elif not train_index.is_file():
        missing_raw = [r for r in d.raw if not Path(r).exists()]
        if not d.raw:
            problems.append(f"data.train_data={d.train_data}: no prepared data there ({train_index} not found)")
        elif missing_raw:
            problems.append(f"data.raw: {', '.join(missing_raw)} not found (and data.train_data is not prepared)")
    if train_index.is_file() and not d.sources:
        problems += prepared_problems(cfg, train_index, "data.train_data")
    if not Path(d.tokenizer).exists():
        problems.append(f"data.tokenizer={d.tokenizer}: not found")
    else:
        from dwmtrain.data.tokenizer import check_vocab, load_tokenizer
        from dwmtrain.errors import DWMTrainError
        from dwmtrain.models.spec import lm_spec

        try:
            vocab = lm_spec(cfg.model).vocab_size
            padded = bool(cfg.model.hf_config or cfg.model.init_from)
            check_vocab(load_tokenizer(d.tokenizer).vocab_size, vocab, d.tokenizer, padded=padded)
        except DWMTrainError as e:
            problems.append(f"data.tokenizer: {e}")
    if "lambada" in (d.val_source, *d.report_sets) and not Path(d.lambada_path).is_file():
        problems.append(f"data.lambada_path={d.lambada_path}: not found (data.val_source=lambada); on a machine with "
                        "a network, python tools/fetch_eval_data.py --out DIR --tasks lambada_openai (in the dwmtrain "
                        "checkout) writes DIR/lambada_openai/test.jsonl; or validate on the data's held-out split: "
                        "data.val_source=heldout")  # fmt: skip
    if "target" in (d.val_source, *d.report_sets) and not Path(d.target.path).exists():
        problems.append(f"data.target.path={d.target.path}: not found")
    if "heldout" in (d.val_source, *d.report_sets):
        held = Path(d.heldout_data or d.train_data) / "index.json"
        field = "data.heldout_data" if d.heldout_data else "data.train_data"
        if held.is_file() and "heldout" not in json.loads(held.read_text()).get("splits", {}):
            problems.append(f"{field}: {held.parent} has no heldout split (data.val_source=heldout)")
        elif not held.is_file() and (d.heldout_data or not d.raw):
            problems.append(f"{field}={held.parent}: no prepared data there (data.val_source=heldout)")
    if deep and d.val_source in ("lambada", "target") and not problems:
        from dwmtrain.data.validation import REPORT, validation_set
        from dwmtrain.errors import DWMTrainError

        try:  # the source reads, tokenizes and splits into a reward and a report part big enough for the run
            validation_set(cfg, REPORT)
        except DWMTrainError as e:
            problems.append(f"data.val_source={d.val_source}: {e}")
    return problems


def _looks_like_a_blend(text: str) -> bool:
    words = text.split()
    return len(words) >= 2 and all(_is_number(w) for w in words[::2])


def _is_number(w: str) -> bool:
    try:
        float(w)
    except ValueError:
        return False
    return True


def source_problems(cfg: Config) -> list[str]:
    """Each source of data.sources: there, of the run's sequence length and tokenizer (prepared), or a Megatron
    file whose index agrees with itself and its .bin."""
    from dwmtrain.data.megatron import is_megatron_prefix, read_index, strip_suffix
    from dwmtrain.errors import DataError

    problems = []
    for i, src in enumerate(cfg.data.sources):
        p, field = Path(src.path), f"data.sources[{i}] ({src.name})"
        if (p / "index.json").is_file():
            problems += prepared_problems(cfg, p / "index.json", field)
        elif is_megatron_prefix(p):
            prefix = strip_suffix(p)
            idx, binf = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
            try:
                if not (idx.is_file() and binf.is_file()):
                    raise DataError(f"{idx if not idx.is_file() else binf}: missing")
                read_index(idx, binf.stat().st_size)
            except DataError as e:
                problems.append(f"{field}: {e}")
        else:
            problems.append(f"{field}.path={src.path}: neither a prepared directory (index.json) nor a "
                            "Megatron/GPT-NeoX prefix (PREFIX.bin and PREFIX.idx)")  # fmt: skip
    return problems


def prepared_problems(cfg: Config, index_path: Path, field: str) -> list[str]:
    """Prepared data the run cannot train on: another sequence length, or another tokenizer than data.tokenizer."""
    d = cfg.data
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        return [f"{field}: {index_path}: cannot be read ({e})"]
    problems = []
    where = f"{field}={index_path.parent}"
    if index.get("seq_len") != d.seq_len:
        problems.append(f"{where}: prepared with seq_len={index.get('seq_len')}, but "
                        f"data.seq_len={d.seq_len}: prepare it again at {d.seq_len}, or set data.seq_len="
                        f"{index.get('seq_len')}")  # fmt: skip
    if Path(d.tokenizer).exists():
        from dwmtrain.data.tokenizer import load_tokenizer
        from dwmtrain.errors import DWMTrainError

        try:
            sha = load_tokenizer(d.tokenizer).sha256
        except DWMTrainError:
            return problems  # said by the tokenizer's own check
        if index.get("tokenizer_sha256") != sha:
            problems.append(f"{where}: tokenized with {index.get('tokenizer')}, not "
                            f"data.tokenizer={d.tokenizer} (their sha256 differ)")  # fmt: skip
    return problems
