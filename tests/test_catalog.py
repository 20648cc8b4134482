"""Model names and paths against hostile spellings and hostile trees: one
canonical name per directory, unprintable names refused, nothing read from
outside the model roots however the tree changes after the configuration was
read, and broken trees answered with ModelNotFound. No worker needed: a real
directory tree in tmp_path, the catalog, the checkpoint reader, wcd.paths and
the sd_notify sender."""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from wcd import paths
from wcd.daemon import systemd as sd
from wcd.daemon.catalog import Catalog
from wcd.daemon.config import parse_settings
from wcd.daemon.errors import ModelNotFound
from wcd.workers.checkpoint import CheckpointError, open_checkpoint


def write_model(directory: Path) -> Path:
    """The smallest directory open_checkpoint accepts."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (directory / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(8))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def catalog_for(tmp_path: Path, roots: list[Path], models: dict | None = None) -> Catalog:
    data = {"model_roots": [str(r) for r in roots],
            "models": {alias: {"path": str(path)} for alias, path in (models or {}).items()}}
    return Catalog(parse_settings(data, str(tmp_path / "wcd.yaml")))


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "models"
    write_model(root / "small-a")
    write_model(root / "small-b")
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A model directory and a secret outside every root."""
    directory = write_model(tmp_path / "outside" / "model")
    (tmp_path / "outside" / "secret").write_text("root:x:0:0::/root:/bin/sh\n")
    return directory


# ---- canonical names ------------------------------------------------------------------


def test_spellings_of_one_directory_are_one_model(tmp_path, root):
    (root / "link-a").symlink_to("small-a")
    catalog = catalog_for(tmp_path, [root])
    spellings = ["small-a", "small-a/./", "./small-a", "small-a//", "small-b/../small-a",
                 "../models/small-a", str(root / "small-a"), str(root) + "//small-a/.",
                 "link-a"]
    entries = [catalog.resolve(s) for s in spellings]
    assert {e.name for e in entries} == {"small-a"}
    assert {e.path for e in entries} == {os.path.realpath(root / "small-a")}
    assert {e.root for e in entries} == {os.path.realpath(root)}


def test_nested_directory_is_named_by_its_relative_path(tmp_path, root):
    write_model(root / "family" / "tiny")
    catalog = catalog_for(tmp_path, [root])
    assert catalog.resolve(str(root / "family" / "tiny")).name == "family/tiny"
    assert catalog.resolve("family//./tiny/").name == "family/tiny"


def test_an_aliased_directory_is_its_alias_under_any_spelling(tmp_path, root):
    catalog = catalog_for(tmp_path, [root], {"chat": root / "small-a"})
    for spelling in ("chat", "small-a", "./small-a/", str(root / "small-a")):
        entry = catalog.resolve(spelling)
        assert (entry.name, entry.configured) == ("chat", True)
    assert catalog.resolve("small-b").name == "small-b"


def test_a_directory_named_like_an_alias_of_another_is_not_served_under_that_name(
        tmp_path, root):
    catalog = catalog_for(tmp_path, [root], {"small-a": root / "small-b"})
    assert catalog.resolve("small-a").path == os.path.realpath(root / "small-b")
    with pytest.raises(ModelNotFound, match="configure an alias"):
        catalog.resolve("./small-a")


def test_hub_cache_entries_are_named_org_slash_name(tmp_path, root):
    entry_dir = root / "hub" / "models--org--tiny"
    old = write_model(entry_dir / "snapshots" / "rev1")
    new = write_model(entry_dir / "snapshots" / "rev2")
    os.utime(old, (1, 1))
    os.utime(new, (2, 2))
    write_model(root / "models--org--flat" / "snapshots" / "r")
    catalog = catalog_for(tmp_path, [root])
    for spelling in ("org/tiny", "hub/models--org--tiny", str(new),
                     "hub/models--org--tiny/snapshots/rev2/"):
        entry = catalog.resolve(spelling)
        assert (entry.name, entry.path) == ("org/tiny", str(new))
    # An older snapshot asked for by its path is a model of its own, named by it.
    assert catalog.resolve(str(old)).name == "hub/models--org--tiny/snapshots/rev1"
    assert catalog.resolve("org/flat").name == "org/flat"


def test_with_two_roots_the_first_wins_and_the_shadowed_directory_is_not_served(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_model(first / "shared")
    write_model(second / "shared")
    write_model(second / "only-here")
    catalog = catalog_for(tmp_path, [first, second])
    entry = catalog.resolve("shared")
    assert (entry.path, entry.root) == (str(first / "shared"), str(first))
    assert catalog.resolve(str(second / "only-here")).name == "only-here"
    assert catalog.resolve(str(second / "only-here")).root == str(second)
    with pytest.raises(ModelNotFound, match="configure an alias"):
        catalog.resolve(str(second / "shared"))


def test_spec_carries_the_real_path_and_its_root(tmp_path, root):
    catalog = catalog_for(tmp_path, [root], {"chat": root / "small-a"})
    spec = catalog.resolve("chat").spec()
    assert (spec.name, spec.path, spec.root) == (
        "chat", os.path.realpath(root / "small-a"), os.path.realpath(root))


# ---- names refused --------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "small-a\n", "extra/\nWATCHDOG_USEC=1\n/..", "\x1b[2Jsmall-a", "small-a\x00",
    "small\x7f-a", "small\x85-a", "small\x9b-a", "small\u2028-a", "small-\ud800a",
    "small-\udcffa", "", "x" * 513,
])
def test_unprintable_or_invalid_names_are_refused(tmp_path, root, name):
    catalog = catalog_for(tmp_path, [root])
    with pytest.raises(ModelNotFound) as refused:
        catalog.resolve(name)
    assert refused.value.param == "model"
    assert str(refused.value).isprintable()


def test_a_directory_with_an_unprintable_name_is_not_served_through_a_link(tmp_path, root):
    write_model(root / "evil\nWATCHDOG_USEC=1")
    (root / "plain").symlink_to("evil\nWATCHDOG_USEC=1")
    catalog = catalog_for(tmp_path, [root])
    with pytest.raises(ModelNotFound):
        catalog.resolve("plain")


# ---- real paths at every resolve ------------------------------------------------------


def test_alias_directory_replaced_by_a_link_out_of_the_root_is_refused(
        tmp_path, root, outside):
    catalog = catalog_for(tmp_path, [root], {"chat": root / "small-a"})
    assert catalog.resolve("chat").path == os.path.realpath(root / "small-a")
    (root / "small-a").rename(root / "moved")
    (root / "small-a").symlink_to(outside)
    with pytest.raises(ModelNotFound, match="outside every model root"):
        catalog.resolve("chat")


def test_alias_directory_retargeted_inside_the_root_follows_the_link(tmp_path, root):
    (root / "current").symlink_to("small-a")
    catalog = catalog_for(tmp_path, [root], {"chat": root / "current"})
    (root / "current").unlink()
    (root / "current").symlink_to("small-b")
    entry = catalog.resolve("chat")
    assert (entry.name, entry.path) == ("chat", os.path.realpath(root / "small-b"))


def test_a_directory_linking_out_of_the_root_is_not_found(tmp_path, root, outside):
    (root / "escape").symlink_to(outside)
    catalog = catalog_for(tmp_path, [root])
    for name in ("escape", str(outside), "../outside/model"):
        with pytest.raises(ModelNotFound):
            catalog.resolve(name)


# ---- broken trees ---------------------------------------------------------------------


def test_symlink_loops_are_not_found(tmp_path, root):
    (root / "loop").symlink_to("loop")
    (root / "ping").symlink_to("pong")
    (root / "pong").symlink_to("ping")
    (root / "hub" / "models--org--loop").mkdir(parents=True)
    (root / "hub" / "models--org--loop" / "snapshots").symlink_to("snapshots")
    catalog = catalog_for(tmp_path, [root])
    for name in ("loop", "ping", "ping/config.json/..", "org/loop", str(root / "pong")):
        with pytest.raises(ModelNotFound):
            catalog.resolve(name)


def test_dangling_hub_snapshot_is_not_found(tmp_path, root):
    snapshots = root / "hub" / "models--org--gone" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "rev").symlink_to("../blobs/missing")
    catalog = catalog_for(tmp_path, [root])
    with pytest.raises(ModelNotFound):
        catalog.resolve("org/gone")


def test_a_dangling_newest_snapshot_leaves_the_usable_one(tmp_path, root):
    snapshots = root / "hub" / "models--org--half" / "snapshots"
    good = write_model(snapshots / "good")
    (snapshots / "newer").symlink_to("../blobs/missing")
    catalog = catalog_for(tmp_path, [root])
    assert catalog.resolve("org/half").path == str(good)


# ---- wcd.paths ------------------------------------------------------------------------


@pytest.fixture(params=["openat2", "realpath"])
def beneath(request, monkeypatch):
    """open_beneath through the kernel's openat2, and through the fallback for
    kernels without it."""
    if request.param == "realpath":
        monkeypatch.setattr(paths, "_openat2_missing", True)
    return paths.open_beneath


def read_beneath(open_beneath, root: Path, relative: str) -> bytes:
    fd = open_beneath(str(root), relative)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_open_beneath_opens_files_and_links_inside_the_root(beneath, root):
    blobs = root / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_text("blob")
    snapshot = root / "hub" / "snap"
    snapshot.mkdir()
    (snapshot / "tokenizer.json").symlink_to("../blobs/abc")
    assert read_beneath(beneath, root, "small-a/tokenizer.json") == b"{}"
    assert read_beneath(beneath, root, "hub/snap/tokenizer.json") == b"blob"
    assert read_beneath(beneath, root, "small-a/../small-b/tokenizer.json") == b"{}"


def test_open_beneath_refuses_every_way_out(beneath, root, outside):
    secret = outside.parent / "secret"
    (root / "abs-link").symlink_to(secret)
    (root / "rel-link").symlink_to(os.path.relpath(secret, root))
    (root / "dir-link").symlink_to(outside)
    for relative in ("../outside/secret", "abs-link", "rel-link", "dir-link/config.json",
                     str(secret), "small-a/../../outside/secret"):
        with pytest.raises(paths.OutsideRoot):
            read_beneath(beneath, root, relative)
    with pytest.raises(FileNotFoundError):
        read_beneath(beneath, root, "small-a/missing")


# ---- the worker's checkpoint check ----------------------------------------------------


def test_checkpoint_opens_beneath_its_root(root):
    checkpoint = open_checkpoint(root / "small-a", str(root))
    assert checkpoint.config["architectures"] == ["TinyForCausalLM"]
    assert checkpoint.frontend_key()
    assert [name for name, _ in checkpoint.read_weights()] == ["w"]


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "tokenizer.json",
                                  "unlisted-extra.bin"])
def test_checkpoint_refuses_a_file_linked_out_of_the_root(root, outside, file):
    target = root / "small-a" / file
    target.unlink(missing_ok=True)
    target.symlink_to(outside.parent / "secret")
    with pytest.raises(CheckpointError, match="outside the model root"):
        open_checkpoint(root / "small-a", str(root))


def test_checkpoint_refuses_a_directory_swapped_for_a_link_out(root, outside):
    (root / "small-a").rename(root / "moved")
    (root / "small-a").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the model root"):
        open_checkpoint(root / "small-a", str(root))


def test_checkpoint_refuses_weights_swapped_out_after_it_was_opened(root, outside):
    checkpoint = open_checkpoint(root / "small-a", str(root))
    (root / "small-a" / "model.safetensors").unlink()
    (root / "small-a" / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the model root"):
        list(checkpoint.read_weights())


def test_checkpoint_without_a_root_reads_as_before(root, outside):
    (root / "small-a" / "config.json").unlink()
    (root / "small-a" / "config.json").symlink_to(outside / "config.json")
    assert open_checkpoint(root / "small-a").config["architectures"] == ["TinyForCausalLM"]


# ---- sd_notify ------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch):
    with tempfile.TemporaryDirectory(prefix="wcd-cat-") as tmp:  # AF_UNIX: 108 bytes
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(f"{tmp}/notify")
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", f"{tmp}/notify")
        yield sock
        sock.close()


def test_notifier_escapes_newlines_and_control_characters(notify_socket):
    notifier = sd.Notifier()
    notifier.status("serving extra/\nWATCHDOG_USEC=1\nMAINPID=1\x1b[2J\u2028\ud800/..")
    notifier.ready("ready\nSTOPPING=1")
    status, ready = (notify_socket.recv(4096).decode() for _ in range(2))
    assert status == ("STATUS=serving extra/\\nWATCHDOG_USEC=1\\nMAINPID=1\\x1b[2J"
                      "\\u2028\\ud800/..")
    assert ready.split("\n") == ["READY=1", "STATUS=ready\\nSTOPPING=1"]
