"""A model directory on disk: what can be checked before the served model is
released, what decides the swap path, and reading its weights.

Cheap on purpose (config.json and safetensors headers only): it runs at the
start of every swap.

Given the model root the directory must lie beneath, every file is opened
through `wcd.paths.open_beneath`, so a directory or file replaced by a symlink
out of the root after the daemon chose it is refused here, at every load.
What this does not close: vLLM opens the files again by path after this check,
so a swap of the directory between the check and vLLM's read is followed. The
directory handed to vLLM is the real path the daemon resolved, which only
someone who may write inside the root can replace.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from wcd.paths import OutsideRoot, check_beneath, open_beneath

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
# A sentence-transformers model's files that vLLM reads for the pooler it
# builds (pooling type, normalization, lengths), with the config of each
# module that modules.json lists.
_POOLING_FILES = ("modules.json", "sentence_bert_config.json",
                  "config_sentence_transformers.json")


class CheckpointError(Exception):
    """The directory cannot be served: missing, unreadable or truncated."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    weights_key: str  # changes when any weight file is replaced or rewritten
    layout: str  # digest of every tensor's name, dtype and shape
    root: str = ""  # every file must resolve beneath it ("": not checked)
    pooling: str = ""  # digest of the sentence-transformers files ("": none)

    def shape_key(self, engine_args: dict[str, Any]) -> str:
        """Equal keys mean the live engine can take these weights in place.
        The tensor layout is part of it: vLLM's in-place reload leaves layers
        half-loaded when a name does not fit, while a rebuild fails cleanly."""
        config = {k: v for k, v in self.config.items() if k not in _SHAPE_NEUTRAL_KEYS}
        return _digest({"config": config, "engine_args": engine_args, "layout": self.layout,
                        "pooling": self.pooling})

    def frontend_key(self) -> str:
        """Equal keys mean the tokenizer, chat template and generation config match."""
        h = hashlib.blake2b(digest_size=16)
        files = _Directory(self.path, self.root)
        for name in _FRONTEND_FILES:
            try:
                with files.open(name) as f:
                    content = f.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
            h.update(name.encode())
            h.update(content)
        return h.hexdigest()

    def read_weights(self) -> Iterator[tuple[str, Any]]:
        """(name, CPU tensor) pairs in checkpoint format, as vLLM's loader yields."""
        from safetensors.torch import load_file

        files = _Directory(self.path, self.root)
        for file in self.weight_files:
            files.check(file.name)
            yield from load_file(file).items()


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(),
                           digest_size=16).hexdigest()


def open_checkpoint(path: str | Path, root: str = "") -> Checkpoint:
    """Check a model directory without loading it; raise CheckpointError.
    With a `root`, the directory and every entry directly in it must resolve
    beneath it (so the files vLLM reads besides these, tokenizer and index
    files, are covered too), and the files read here are opened beneath it."""
    directory = Path(path)
    files = _Directory(directory, root)
    names = files.names()
    for name in names:
        files.check(name)
    config_file = directory / "config.json"
    if "config.json" not in names:
        raise CheckpointError(f"{directory} has no config.json")
    try:
        with files.open("config.json") as f:
            config = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    weight_files = tuple(sorted(directory / n for n in names if n.endswith(".safetensors")))
    if not weight_files:
        raise CheckpointError(f"{directory} has no *.safetensors weights")
    tensors, stats = {}, []
    for file in weight_files:
        try:
            with files.open(file.name) as f:
                st = os.fstat(f.fileno())
                tensors.update(_check_safetensors(f, file, st.st_size))
        except OSError as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
        stats.append((file.name, st.st_size, st.st_mtime_ns))
    return Checkpoint(directory, config, weight_files, _digest(stats), _digest(tensors), root,
                      _pooling_key(files, names))


def _pooling_key(files: _Directory, names: list[str]) -> str:
    """The pooler is built from these files, not from anything a same-shape
    swap reloads: checkpoints that differ in them must not share an engine.
    Read beneath the root, as vLLM reads them by path."""
    contents = {name: _read_json(files, name) for name in _POOLING_FILES if name in names}
    if not contents:
        return ""
    modules = contents.get("modules.json")
    for module in modules if isinstance(modules, list) else ():
        path = module.get("path") if isinstance(module, dict) else None
        if isinstance(path, str) and path and path.split("/", 1)[0] in names:
            contents[f"{path}/config.json"] = _read_json(files, f"{path}/config.json")
    return _digest(contents)


def _read_json(files: _Directory, name: str) -> Any:
    try:
        with files.open(name) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{files.path / name} is not valid JSON: {exc}") from exc


class _Directory:
    """A model directory's entries, opened beneath `root` where one is given
    ("": as plain paths)."""

    def __init__(self, path: Path, root: str):
        self.path = path
        self.root = root
        # Not under `root` as written: the `..` steps stay, and open_beneath refuses them.
        self.relative = os.path.relpath(os.path.abspath(path), root) if root else ""

    def names(self) -> list[str]:
        try:
            if not self.root:
                return os.listdir(self.path)
            fd = open_beneath(self.root, self.relative, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return os.listdir(fd)
            finally:
                os.close(fd)
        except OutsideRoot as exc:
            raise self._outside(self.path) from exc
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointError(f"model directory {self.path} does not exist") from exc
        except OSError as exc:
            raise CheckpointError(f"model directory {self.path} cannot be read: "
                                  f"{exc.strerror}") from exc

    def check(self, name: str) -> None:
        """Refuse an entry that resolves outside the root; one that does not
        resolve at all is left to whoever needs it."""
        if not self.root:
            return
        try:
            check_beneath(self.root, os.path.join(self.relative, name))
        except OutsideRoot as exc:
            raise self._outside(self.path / name) from exc
        except OSError:
            pass

    def open(self, name: str) -> IO[bytes]:
        if not self.root:
            return (self.path / name).open("rb")
        try:
            return os.fdopen(open_beneath(self.root, os.path.join(self.relative, name)), "rb")
        except OutsideRoot as exc:
            raise self._outside(self.path / name) from exc

    def _outside(self, path: Path) -> CheckpointError:
        return CheckpointError(f"{path} lies outside the model root {self.root}")


def _check_safetensors(f: IO[bytes], file: Path, size: int) -> dict[str, list]:
    """A safetensors file is an 8-byte header length, a JSON header, then data
    whose extent the header states: a truncated download shows here. Returns
    {tensor name: [dtype, shape]}."""
    try:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CheckpointError(f"{file} is truncated (header of {header_len} bytes)")
        header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file} is truncated: {size} bytes, header says {8 + header_len + end}")
    return {k: [t["dtype"], t["shape"]] for k, t in header.items() if k != "__metadata__"}
