"""Which models the daemon may serve, and where their files are.

A model name is a configured alias, a directory under one of the configured
model roots, or a hub id found in a hub cache under a model root. Nothing ever
resolves outside the roots: `../../etc/passwd` is simply not found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wcd.daemon.config import Settings
from wcd.daemon.errors import ModelNotFound
from wcd.workers import protocol as p

_MAX_NAME = 512


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the canonical name: what the worker serves and ps shows
    path: str
    engine_args: dict
    keep_alive_s: float | None  # None: the policy's default
    configured: bool

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_args.get("tensor_parallel_size", 1))

    def spec(self) -> p.ModelSpec:
        return p.ModelSpec(self.name, self.path, self.engine_args)

    def disk_bytes(self) -> int:
        try:
            return sum(f.stat().st_size for f in Path(self.path).glob("*.safetensors"))
        except OSError:
            return 0


class Catalog:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._roots = tuple(Path(r).resolve() for r in settings.model_roots)
        self._configured = {
            name: ModelEntry(name, m.path, settings.engine_args(m), m.keep_alive_s, True)
            for name, m in settings.models.items()
        }
        self._by_path = {os.path.realpath(e.path): e for e in self._configured.values()}

    def configured(self) -> list[ModelEntry]:
        return list(self._configured.values())

    def resolve(self, name: str) -> ModelEntry:
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME or "\0" in name:
            raise ModelNotFound("model name must be a non-empty string", param="model")
        entry = self._configured.get(name)
        if entry is not None:
            return entry
        directory = self._find_directory(name)
        if directory is None:
            raise ModelNotFound(
                f"model {name!r} is neither configured nor a model directory under the "
                f"model roots", param="model")
        known = self._by_path.get(str(directory))
        if known is not None:
            return known
        return ModelEntry(name, str(directory), dict(self._settings.defaults), None, False)

    def _find_directory(self, name: str) -> Path | None:
        candidates = [Path(name)] if os.path.isabs(name) else [r / name for r in self._roots]
        if name.count("/") == 1 and not os.path.isabs(name):
            hub_dir = "models--" + name.replace("/", "--")
            candidates += [r / "hub" / hub_dir for r in self._roots]
            candidates += [r / hub_dir for r in self._roots]
        for candidate in candidates:
            directory = _snapshot_of(candidate.resolve())
            if directory is not None and self._inside_roots(directory) and (
                    directory / "config.json").is_file():
                return directory
        return None

    def _inside_roots(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self._roots)


def _snapshot_of(path: Path) -> Path | None:
    """A hub cache entry's newest snapshot, or the directory itself."""
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        revisions = sorted(snapshots.iterdir(), key=lambda d: d.stat().st_mtime)
        return revisions[-1].resolve() if revisions else None
    return path if path.is_dir() else None
