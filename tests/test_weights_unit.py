"""Unit tests of the host cache's bookkeeping with plain torch modules: the
kernel-format copy (the CUDA path) keeps parameter storage, the pool reuses
freed ranges, eviction is least recently used under the budget, pinning
(with a stand-in for CUDA's registration) leaves ranges in use alone."""

from __future__ import annotations

import threading

import torch

from wcd.workers import weights
from wcd.workers.weights import KERNEL, HostCache, copy_into, kernel_format_holds

KB = 1024


def module(seed: int, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))


def snapshot_of(cache: HostCache, key: str, model: torch.nn.Module):
    return cache.take(key, key, KERNEL, dict(model.named_parameters()))


def test_copy_into_restores_values_and_keeps_storage():
    cache = HostCache(64 * KB, pinned=False)
    a, b = module(1), module(2)
    assert kernel_format_holds(a)
    snapshot = snapshot_of(cache, "a", a)
    pointers = [p.data_ptr() for p in b.parameters()]
    copied = copy_into(b, snapshot)
    assert copied == sum(p.numel() * p.element_size() for p in a.parameters())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert [p.data_ptr() for p in b.parameters()] == pointers  # graphs stay valid


def test_snapshot_is_a_copy_not_a_view_of_the_live_model():
    cache = HostCache(64 * KB, pinned=False)
    a = module(1)
    snapshot = snapshot_of(cache, "a", a)
    with torch.no_grad():
        a[0].weight.add_(1.0)
    assert not torch.equal(snapshot.tensors["0.weight"], a[0].weight)


def test_lru_eviction_and_reuse_of_freed_ranges():
    one = snapshot_of(HostCache(1 << 20, pinned=False), "probe", module(0)).nbytes  # aligned
    cache = HostCache(int(2.5 * one), pinned=False)  # room for two
    for key in ("a", "b"):
        assert snapshot_of(cache, key, module(ord(key))) is not None
    assert cache.get("a") is not None  # a is now the most recently used
    assert snapshot_of(cache, "c", module(3)) is not None
    assert [c.name for c in cache.contents()] == ["a", "c"]  # b was evicted
    assert cache.evictions == 1 and cache.get("b") is None
    cache.drop("a")
    assert snapshot_of(cache, "d", module(4)) is not None  # fits where a was
    assert [c.name for c in cache.contents()] == ["c", "d"]


def test_too_large_or_no_budget_is_refused():
    big = module(0, width=256)
    assert HostCache(1 * KB, pinned=False).take("x", "x", KERNEL,
                                                dict(big.named_parameters())) is None
    disabled = HostCache(0, pinned=False)
    assert not disabled.enabled
    assert disabled.take("x", "x", KERNEL, dict(big.named_parameters())) is None


def test_mismatched_snapshot_is_refused():
    cache = HostCache(64 * KB, pinned=False)
    snapshot = snapshot_of(cache, "a", module(1))
    try:
        copy_into(module(2, width=8), snapshot)
    except ValueError as exc:
        assert "does not match" in str(exc)
    else:
        raise AssertionError("copied a snapshot into a model of another shape")


def test_a_buffer_allocated_ahead_serves_the_first_snapshot():
    cache = HostCache(64 * KB, pinned=False)
    cache.allocate_soon()
    a = module(1)
    snapshot = snapshot_of(cache, "a", a)
    for name, param in a.named_parameters():
        assert torch.equal(snapshot.tensors[name], param)


def test_pinning_skips_ranges_in_use_and_device_copies_wait_for_it():
    """A range allocated before the pinning thread faults its pages in (a
    snapshot file read right after a restart) keeps what is written there;
    the rest is faulted in; wait_pinned returns once the buffer is registered."""
    release, registered = threading.Event(), []

    def register(buffer):
        release.wait(10)
        registered.append(buffer.numel())

    pool = weights._Pool(4 * KB, register, fill_chunk=1 * KB)
    in_use = pool.allocate(1536)  # spans two chunks
    pool.buffer[in_use:in_use + 1536].fill_(7)  # the buffer, and the pinning, start here
    waiter = threading.Thread(target=pool.wait_pinned)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not registered  # held at the registration
    release.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert registered == [4 * KB + weights._ALIGN]  # the whole allocation, slack included
    assert bool((pool.buffer[:1536] == 7).all()) and bool((pool.buffer[1536:] == 0).all())


def test_a_failed_pinning_leaves_copies_to_pageable_memory(caplog):
    def register(buffer):
        raise RuntimeError("cudaHostRegister failed: 2")

    pool = weights._Pool(2 * KB, register, fill_chunk=1 * KB)
    pool.wait_pinned()  # returns rather than hanging
    assert "pinning its buffer failed" in caplog.text
