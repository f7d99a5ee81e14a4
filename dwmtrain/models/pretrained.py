"""A Hugging Face checkpoint directory's weights, read one tensor at a time (safetensors, sharded or not), so a
continued-pretraining run never holds a second full copy of the model to load the first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dwmtrain.errors import ConfigError


class PretrainedWeights:
    """The tensors of ``model.safetensors`` or of the shards ``model.safetensors.index.json`` lists."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"model.init_from={self.dir}: {index.name} is not a safetensors index ({e})"
                ) from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = ", ".join(sorted(p.name for p in self.dir.iterdir())[:8]) if self.dir.is_dir() else "nothing"
            raise ConfigError(
                f"model.init_from={self.dir}: no model.safetensors or model.safetensors.index.json (found: {found}); "
                "save the model with save_pretrained(safe_serialization=True)"
            )
        self._where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(self.dir / f), framework="pt") as h:
                    for name in h.keys():
                        self._where[name] = f
                        self.shapes[name] = tuple(h.get_slice(name).get_shape())
            except Exception as e:  # noqa: BLE001 - a shard that cannot be read (missing, cut short) is the file's fault
                raise ConfigError(f"model.init_from={self.dir}: {f} cannot be read ({e})") from None

    def problems(self, want: dict[str, tuple[int, ...]], tied: bool) -> list[str]:
        """What keeps these weights from ``want`` ({name: shape} of the model): missing, extra, another shape."""
        have = dict(self.shapes)
        if tied:
            have.pop("lm_head.weight", None)  # the tied head is the embedding
        out = [f"{n} missing" for n in want if n not in have]
        out += [f"{n} is {have[n]}, the model's is {s}" for n, s in want.items() if n in have and have[n] != s]
        return out + [f"{n} is not in the model" for n in have if n not in want]

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.dir / self._where[name]), framework="pt") as h:
            return h.get_tensor(name)
