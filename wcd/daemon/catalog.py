"""Which models the daemon may serve, and where their files are.

A model name is a configured alias, a directory under one of the configured
model roots, or a hub id found in a hub cache under a model root. Nothing ever
resolves outside the roots: `../../etc/passwd` is simply not found. The check
runs at every resolve, on the directory's real path, so an alias whose
directory was replaced by a symlink out of its root after the configuration
was read is refused; the worker checks again, file by file, when it opens the
checkpoint (`ModelSpec.root`, `wcd.paths`).

Every directory has one canonical name, the only one the scheduler, metrics
and `wcctl ps` see, however a client spelled it:

- a configured alias's directory is that alias;
- the newest snapshot of a hub cache entry (`root/hub/models--org--name` or
  `root/models--org--name`) is `org/name`;
- any other directory is its real path relative to the root it lies in
  (`./small-a`, `small-a//`, `/srv/models/small-a` are all `small-a`).

With several roots, a relative name means the directory in the first root
that has one. A directory that none of its names reaches back (the same
relative path exists in an earlier root, or an alias has that name) is
shadowed: it is served only under an alias of its own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from wcd.daemon.config import Settings
from wcd.daemon.errors import ModelNotFound
from wcd.paths import within
from wcd.workers import protocol as p

log = logging.getLogger(__name__)

_MAX_NAME = 512
_HUB_PREFIX = "models--"


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the canonical name: what the worker serves and ps shows
    path: str  # the directory's real path when resolved
    engine_args: dict
    keep_alive_s: float | None  # None: the policy's default
    configured: bool
    root: str = ""  # the model root (real path) the directory lies beneath
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_args.get("tensor_parallel_size", 1))

    def spec(self) -> p.ModelSpec:
        return p.ModelSpec(self.name, self.path, self.engine_args, self.root,
                           self.tool_call_parser, self.reasoning_parser)

    def disk_bytes(self) -> int:
        try:
            return sum(f.stat().st_size for f in Path(self.path).glob("*.safetensors"))
        except OSError:
            return 0


class Catalog:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._roots = tuple(os.path.realpath(r) for r in settings.model_roots)
        self._configured = {
            name: ModelEntry(name, m.path, settings.engine_args(m), m.keep_alive_s, True,
                             tool_call_parser=m.tool_call_parser,
                             reasoning_parser=m.reasoning_parser)
            for name, m in settings.models.items()
        }
        self._alias_at = {os.path.realpath(e.path): e.name for e in self._configured.values()}

    def configured(self) -> list[ModelEntry]:
        return list(self._configured.values())

    def resolve(self, name: str) -> ModelEntry:
        _check_name(name)
        if name in self._configured:
            return self._configured_entry(name)
        found = self._find_directory(name)
        if found is None:
            raise ModelNotFound(
                f"model {name!r} is neither configured nor a model directory under the "
                f"model roots", param="model")
        return self._entry_at(*found)

    def _configured_entry(self, alias: str) -> ModelEntry:
        """The alias's entry with its directory's current real path, which must
        still lie inside a root."""
        entry = self._configured[alias]
        directory = os.path.realpath(entry.path)
        root = self._root_of(directory)
        if root is None:
            log.warning("model %r: %s now resolves to %s, outside every model root",
                        alias, entry.path, directory)
            raise ModelNotFound(f"model {alias!r} is configured, but its directory now lies "
                                f"outside every model root", param="model")
        return replace(entry, path=directory, root=root)

    def _entry_at(self, directory: str, root: str) -> ModelEntry:
        alias = self._alias_at.get(directory)
        if alias is not None and os.path.realpath(self._configured[alias].path) == directory:
            return replace(self._configured[alias], path=directory, root=root)
        for name in _names_of(directory, root):
            if _usable(name) and name not in self._configured and \
                    self._find_directory(name) == (directory, root):
                return ModelEntry(name, directory, dict(self._settings.defaults), None, False,
                                  root)
        raise ModelNotFound(
            f"the model directory {os.path.relpath(directory, root)!r} has no name of its own "
            f"(another model has it, or it is not printable); configure an alias for it",
            param="model")

    def _find_directory(self, name: str) -> tuple[str, str] | None:
        """(real path, real root) of the model directory `name` means, if any."""
        if os.path.isabs(name):
            candidates = [name]
        else:
            candidates = [os.path.join(r, name) for r in self._roots]
            if name.count("/") == 1:
                hub_dir = _HUB_PREFIX + name.replace("/", "--")
                candidates += [os.path.join(r, "hub", hub_dir) for r in self._roots]
                candidates += [os.path.join(r, hub_dir) for r in self._roots]
        for candidate in candidates:
            directory = _snapshot_of(os.path.realpath(candidate))
            root = self._root_of(directory) if directory is not None else None
            if root is not None and os.path.isfile(os.path.join(directory, "config.json")):
                return directory, root
        return None

    def _root_of(self, real_path: str) -> str | None:
        """The first root the real path lies in."""
        return next((root for root in self._roots if within(real_path, root)), None)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _usable(name):
        raise ModelNotFound(f"a model name must be printable text of 1 to {_MAX_NAME} "
                            f"characters, without control characters", param="model")


def _usable(name: str) -> bool:
    """Whether `name` may name a model, as asked or as canonical name. It
    reaches paths, logs, sd_notify datagrams and terminals, so no control
    characters (C0, C1, DEL), nothing else unprintable, and only valid
    Unicode (undecodable bytes arrive as lone surrogates, which are not
    printable)."""
    return 0 < len(name) <= _MAX_NAME and name.isprintable()


def _names_of(directory: str, root: str) -> list[str]:
    """The names that may be a directory's canonical one, preferred first."""
    relative = os.path.relpath(directory, root)
    parts = relative.split(os.sep)
    entry = parts[1:] if parts[0] == "hub" else parts
    if len(entry) == 3 and entry[0].startswith(_HUB_PREFIX) and entry[1] == "snapshots":
        repo = entry[0][len(_HUB_PREFIX):].split("--")
        cache_entry = os.path.dirname(os.path.dirname(directory))
        if len(repo) == 2 and _snapshot_of(cache_entry) == directory:
            return ["/".join(repo), relative]
    return [relative]


def _snapshot_of(path: str) -> str | None:
    """A hub cache entry's newest usable snapshot (real path), or the
    directory itself; None when neither is there. Broken links and loops
    count as absent."""
    snapshots = os.path.join(path, "snapshots")
    if not os.path.isdir(snapshots):
        return path if os.path.isdir(path) else None
    revisions = []
    try:
        with os.scandir(snapshots) as entries:
            for entry in entries:
                try:
                    if entry.is_dir():
                        revisions.append((entry.stat().st_mtime, entry.name))
                except OSError:
                    continue
    except OSError:
        return None
    return os.path.realpath(os.path.join(snapshots, max(revisions)[1])) if revisions else None
