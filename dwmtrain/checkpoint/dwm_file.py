"""The DWM file format: safetensors + a JSON sidecar (architecture, stage, LM step, tokenizer, sha256 of the tensor
file). The fields that decide the weights also sit in the safetensors header, under the checksum: loading verifies
the checksum, that the sidecar agrees with the header, every architecture field, and the tensors' shapes; every
way a file can be wrong is one ``DWMFileError`` naming the file and the field."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from dwmtrain.errors import ConfigError, DWMInputError, DWMTrainError
from dwmtrain.faults import fault_point
from dwmtrain.fileio import atomic_file, atomic_write_text, sha256_file
from dwmtrain.models.dwm import FEATURES, POOLINGS, DataWeightingModel, DWMArch, dwm_from_state
from dwmtrain.models.spec import ATTN_IMPLEMENTATIONS, PRESETS, ModelSpec
from dwmtrain.models.weights import NORMALIZATIONS


class DWMFileError(DWMTrainError, ValueError):
    """A DWM file is missing, corrupted or of another architecture."""


def meta_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


FORMAT = "dwmtrain-dwm-v2"


_SIGNED_KEY = "dwmtrain"  # the safetensors header entry holding the metadata (covered by the file's sha256)


def save_dwm(model: DataWeightingModel, path: str | os.PathLike, stage: int, lm_step: int, **extra) -> dict:
    """Write ``path`` (safetensors) and ``path.json`` atomically; returns the metadata.

    The fields that decide the weights (architecture, stage, LM step) are written twice: readable in the JSON
    sidecar, and inside the safetensors header, which the sidecar's sha256 covers, so an edit to the
    sidecar (a temperature, a pooling) is caught on load.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    signed = {"format": FORMAT, "arch": asdict(model.arch), "stage": stage, "lm_step": lm_step}
    meta = {**signed, "num_parameters": sum(v.numel() for v in state.values()), **extra}
    # what changes the weights is signed; the rest (timings, paths) is information, so the same fit gives the
    # same sha256 in any run directory
    # one header entry: safetensors writes several in no fixed order, and the sha256 must be reproducible
    with atomic_file(path) as tmp:  # tensors first, metadata last: the sidecar marks the file complete
        save_file(state, str(tmp), metadata={_SIGNED_KEY: json.dumps(signed, sort_keys=True)})
        meta["sha256"] = sha256_file(tmp)
    fault_point("dwm-tensors-written", stage=stage)
    atomic_write_text(meta_path(path), json.dumps(meta, indent=1))
    return meta


def read_dwm_meta(path: str | os.PathLike) -> dict:
    mp = meta_path(path)
    if not Path(path).is_file():
        raise DWMFileError(f"DWM file {path}: not found")
    try:
        meta = json.loads(mp.read_text())
    except FileNotFoundError:
        raise DWMFileError(f"DWM file {path}: metadata {mp} missing (incomplete write?)") from None
    except json.JSONDecodeError as e:
        raise DWMFileError(f"DWM metadata {mp}:{e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DWMFileError(f"DWM metadata {mp}: cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise DWMFileError(f"DWM metadata {mp}: expected a JSON object, got {type(meta).__name__}")
    return meta


def arch_from_meta(arch: object, where: str) -> DWMArch:
    """A DWMArch from a metadata ``arch`` object, every field checked; DWMFileError names the field."""
    if not isinstance(arch, dict):
        raise DWMFileError(f"{where}: field 'arch' {'missing' if arch is None else 'must be an object'}")
    unknown = sorted(set(arch) - {f.name for f in fields(DWMArch)})
    if unknown:
        raise DWMFileError(f"{where}: field arch.{unknown[0]} is not a DWM setting (written by a newer dwmtrain?)")
    missing = [k for k in ("backbone", "vocab_size", "max_seq_len") if k not in arch]
    if missing:
        raise DWMFileError(f"{where}: field arch.{missing[0]} missing")

    def bad(k, why):
        return DWMFileError(f"{where}: field arch.{k}={arch[k]!r}: {why}")

    for k in ("vocab_size", "max_seq_len", "attn_heads", "head_hidden"):
        if k in arch and (type(arch[k]) is not int or arch[k] < (0 if k == "head_hidden" else 1)):
            raise bad(k, "must be a " + ("non-negative" if k == "head_hidden" else "positive") + " integer")
    for k in ("temperature", "uniform_mix"):
        if k in arch and (type(arch[k]) not in (int, float) or arch[k] != arch[k]):
            raise bad(k, "must be a number")
    if "loss_feature" in arch and type(arch["loss_feature"]) is not bool:
        raise bad("loss_feature", "must be true or false")
    if arch.get("backbone_config"):
        try:
            ModelSpec.from_fields(arch["backbone"], json.loads(arch["backbone_config"]))
        except (ConfigError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise bad("backbone_config", f"not a supported model config ({e})") from None
    elif arch["backbone"] not in PRESETS:
        raise bad("backbone", f"not one of the presets {sorted(PRESETS)}")
    if arch.get("features", "backbone") not in FEATURES:
        raise bad("features", f"must be one of {FEATURES}")
    if arch.get("pooling", "mean") not in POOLINGS:
        raise bad("pooling", f"must be one of {POOLINGS}")
    if arch.get("normalization", "softmax") not in NORMALIZATIONS:
        raise bad("normalization", f"must be one of {NORMALIZATIONS}")
    if arch.get("attn_implementation", "sdpa") not in ATTN_IMPLEMENTATIONS:
        raise bad("attn_implementation", f"must be one of {ATTN_IMPLEMENTATIONS}")
    if arch.get("temperature", 1.0) <= 0:
        raise bad("temperature", "must be > 0")
    if not 0 <= arch.get("uniform_mix", 0.0) <= 1:  # as dwm.uniform_mix allows (1: exactly uniform)
        raise bad("uniform_mix", "must be in [0, 1]")
    a = DWMArch(**arch)
    if a.backbone_spec().hidden_size % a.attn_heads:
        raise bad("attn_heads", f"must divide the {a.backbone} backbone's hidden size")
    return a


def arch_mismatch(file: DWMArch, run: DWMArch) -> list[str]:
    """Where a DWM file's architecture differs from the run's in a way its tensors cannot absorb."""
    a, b = file.shape_fields(), run.shape_fields()
    out = [f"{k}: file has {a[k]!r}, run expects {b[k]!r}" for k in a if a[k] != b[k] and k != "backbone_config"]
    fa, fb = json.loads(a["backbone_config"]), json.loads(b["backbone_config"])
    out += [f"backbone {k}: file has {fa.get(k)!r}, run expects {fb.get(k)!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]  # fmt: skip
    return out


def _signed_meta(path: Path) -> dict:
    """The metadata held in the safetensors header, under the checksum."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if _SIGNED_KEY not in header:
        raise DWMFileError(f"DWM file {path}: no signed metadata in its header (not a {FORMAT} file)")
    return json.loads(header[_SIGNED_KEY])


def load_dwm_state(
    path: str | os.PathLike, expect: DWMArch | None = None
) -> tuple[DWMArch, dict[str, torch.Tensor], dict]:
    """Verify sha256, the metadata and the architecture, then read the tensors (safetensors: no pickle).

    Every way a DWM file can be wrong is a ``DWMFileError`` naming the file (and the field)."""
    try:
        return _load_dwm_state(Path(path), expect)
    except DWMFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a file we cannot read is the file's fault, said as such
        raise DWMFileError(f"DWM file {path}: cannot be read ({type(e).__name__}: {e})") from None


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted field, a's value, b's value) of the first field where two metadata dicts differ, or None."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            if found := _first_difference(x, y, f"{prefix}{k}."):
                return found
        elif x != y:
            return f"{prefix}{k}", x, y
    return None


def _load_dwm_state(path: Path, expect: DWMArch | None):
    from safetensors.torch import load_file

    meta = read_dwm_meta(path)
    mp = meta_path(path)
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise DWMFileError(
            f"DWM file {path}: sha256 {digest[:12]}... does not match its metadata "
            f"({str(meta.get('sha256'))[:12]}...): corrupted or replaced"
        )
    signed = _signed_meta(path)  # the sidecar must say what the checksummed header says
    if diff := _first_difference(signed, {k: meta.get(k) for k in signed}):
        field, saved, now = diff
        raise DWMFileError(
            f"DWM metadata {mp}: field {field} is {now!r} but the DWM file was saved with {saved!r} "
            "(the sidecar was edited); restore it"
        )
    arch = arch_from_meta(meta.get("arch"), f"DWM metadata {mp}")
    if expect is not None and (diff := arch_mismatch(arch, expect)):
        raise DWMFileError(f"DWM file {path} has another architecture: " + "; ".join(diff))
    state = load_file(str(path))
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in DataWeightingModel(arch).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        k = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
        raise DWMFileError(
            f"DWM file {path}: tensor {k} is {got.get(k, 'missing')}, its metadata's architecture needs "
            f"{want.get(k, 'no such tensor')}"
        )
    return arch, state, meta


def check_dwm_tokenizer(meta: dict, path, tokenizer: str, tokenizer_sha: str) -> None:
    """Refuse a DWM fitted on data of another tokenizer than the run's (its ids would mean other text)."""
    want = meta.get("tokenizer_sha256")
    if want and tokenizer_sha and want != tokenizer_sha:
        raise DWMFileError(
            f"DWM file {path} was fitted with tokenizer {meta.get('tokenizer', '?')} (sha256 {want[:12]}...), this "
            f"run's is data.tokenizer={tokenizer} (sha256 {tokenizer_sha[:12]}...): the DWM and the LM must share one"
        )


def check_dwm_micro_batch(meta: dict, path, micro_batch: int, field: str) -> None:
    """Refuse micro-batches smaller than the DWM was fitted on: it weighs each sample against the rest of its
    micro-batch (a softmax over it), so a smaller one is a setting it never learned (a larger one is allowed)."""
    fitted = meta.get("micro_batch_size") or 0
    if micro_batch < fitted:
        raise DWMInputError(
            f"{field}={micro_batch}: DWM file {path} was fitted on micro-batches of {fitted} samples and weighs each "
            f"sample against the rest of its micro-batch; give it at least {fitted}"
        )


def load_dwm(path: str | os.PathLike, expect: DWMArch | None = None, **arch_overrides) -> DataWeightingModel:
    arch, state, _ = load_dwm_state(path, expect)
    if arch_overrides:
        arch = DWMArch(**{**asdict(arch), **arch_overrides})
    return dwm_from_state(arch, state)
