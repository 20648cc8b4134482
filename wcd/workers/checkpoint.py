"""A model directory on disk: what can be checked before the served model is
released, what decides the swap path, and reading its weights.

Cheap on purpose (config.json and safetensors headers only): it runs at the
start of every swap.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# config.json keys that change neither the computation graph nor any buffer
# vLLM derives at build time, so two checkpoints that differ only in them can
# swap in place. Anything not listed here forces a rebuild: conservative.
_SHAPE_NEUTRAL_KEYS = frozenset({
    "_name_or_path", "transformers_version", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "output_attentions", "output_hidden_states",
    "torch_dtype", "dtype",  # the engine's dtype arg decides, and is in the key
})
# Files that define the frontend: tokenizer, chat template, sampling defaults.
_FRONTEND_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)


class CheckpointError(Exception):
    """The directory cannot be served: missing, unreadable or truncated."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    weights_key: str  # changes when any weight file is replaced or rewritten
    layout: str  # digest of every tensor's name, dtype and shape

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]
        return archs[0]

    def shape_key(self, engine_args: dict[str, Any]) -> str:
        """Equal keys mean the live engine can take these weights in place.
        The tensor layout is part of it: vLLM's in-place reload leaves layers
        half-loaded when a name does not fit, while a rebuild fails cleanly."""
        config = {k: v for k, v in self.config.items() if k not in _SHAPE_NEUTRAL_KEYS}
        return _digest({"config": config, "engine_args": engine_args, "layout": self.layout})

    def frontend_key(self) -> str:
        """Equal keys mean the tokenizer, chat template and generation config match."""
        h = hashlib.blake2b(digest_size=16)
        for name in _FRONTEND_FILES:
            file = self.path / name
            if file.is_file():
                h.update(name.encode())
                h.update(file.read_bytes())
        return h.hexdigest()

    def read_weights(self) -> Iterator[tuple[str, Any]]:
        """(name, CPU tensor) pairs in checkpoint format, as vLLM's loader yields."""
        from safetensors.torch import load_file

        for file in self.weight_files:
            yield from load_file(file).items()


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(),
                           digest_size=16).hexdigest()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Check a model directory without loading it; raise CheckpointError."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    weight_files = tuple(sorted(directory.glob("*.safetensors")))
    if not weight_files:
        raise CheckpointError(f"{directory} has no *.safetensors weights")
    tensors = {}
    for file in weight_files:
        tensors.update(_check_safetensors(file))
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files]
    return Checkpoint(directory, config, weight_files, _digest(stats), _digest(tensors))


def _check_safetensors(file: Path) -> dict[str, list]:
    """A safetensors file is an 8-byte header length, a JSON header, then data
    whose extent the header states: a truncated download shows here. Returns
    {tensor name: [dtype, shape]}."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{file} is truncated (header of {header_len} bytes)")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file} is truncated: {size} bytes, header says {8 + header_len + end}")
    return {k: [t["dtype"], t["shape"]] for k, t in header.items() if k != "__metadata__"}
