"""What status pages, `wcctl ps`, /status.json and /metrics show: read-only
views of the scheduler's state (scheduler_core.State), taken on the event
loop between two of the owner's events, so never half-changed."""

from __future__ import annotations

from collections.abc import Callable

from wcd.daemon.catalog import Catalog
from wcd.daemon.policy import (DRAINING, LOADING, READY, SERVING, SUSPENDED, SUSPENDING)
from wcd.daemon.scheduler_core import State, Worker, budget, max_resident
from wcd.daemon.worker_process import WorkerProcess
from wcd.proc_stats import rss_bytes

# What a worker is doing, for one-word displays (wcctl ps, the status page).
IDLE, SWAPPING, SUSPENDING_WORKER = "idle", "swapping", "suspending"


def active(state: State, worker: Worker) -> int:
    """Leases held on the worker, on whatever model: one forced out keeps its
    leases until their requests end."""
    return sum(lease.worker == worker.index and lease.incarnation == worker.incarnation
               for lease in state.leases.values())


def worker_state(worker: Worker) -> str:
    if worker.phase != READY:
        return worker.phase
    if worker.op is not None:
        if not worker.op.running:
            return DRAINING
        return SUSPENDING_WORKER if worker.op.kind == "suspend" else SWAPPING
    return SERVING if worker.residents else IDLE


def worker_model(worker: Worker) -> str | None:
    """The one model a one-model display shows: the one coming in, else the
    last that came in and serves."""
    op = worker.op
    if op is not None and op.running and op.kind == "swap":
        return op.entry.name
    serving = [n for n, r in worker.residents.items() if r.state in (SERVING, DRAINING)]
    return serving[-1] if serving else next(reversed(worker.residents), None)


def worker_views(state: State, process: Callable[[int], WorkerProcess | None]) -> list[dict]:
    waiting = waiting_by_model(state)
    result = []
    for worker in state.workers:
        settings = worker.settings
        proc = process(worker.index)
        ready = proc.ready if proc is not None else None
        residents = [{"model": r.name, "state": r.state, "bytes": r.bytes,
                      "active": r.active, "running": r.running,
                      "waiting": waiting.get(r.name, 0), "rank": r.rank}
                     for r in worker.residents.values()]
        model = worker_model(worker)
        entry = worker.residents.get(model).entry if model in worker.residents else None
        result.append({
            "index": worker.index, "device": settings.device,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "serves_tensor_parallel_sizes": list(settings.serves),
            "model_tensor_parallel_size": entry.tensor_parallel_size if entry else None,
            "pid": proc.pid if proc else None,
            "group_pids": list(ready.group_pids) if ready else [],
            "state": worker_state(worker), "model": model, "residents": residents,
            "active": active(state, worker),
            "running": sum(r.running for r in worker.residents.values()),
            "restarts": worker.restarts,
            "rss_bytes": rss_bytes(proc.pid) if proc else None,
            "device_bytes": worker.device_bytes,
            "resident_bytes": sum(r.bytes for r in worker.residents.values()),
            "memory_budget_bytes": budget(state, worker),
            "max_resident": max_resident(state, worker),
            "last_swap": worker.last_swap})
    return result


def model_views(state: State, catalog: Catalog) -> list[dict]:
    """Every model configured or held: where it is and in what state."""
    held = {}
    for worker in state.workers:
        for resident in worker.residents.values():
            held[resident.name] = (worker.index, resident)
    entries = {e.name: e for e in catalog.configured()}
    entries.update({r.name: r.entry for _, r in held.values()})
    cached = {name: size for w in state.workers for name, size in w.cached.items()}
    parked = {name: (w.index, size) for w in state.workers for name, size in w.parked.items()}
    views = []
    for name, entry in entries.items():
        worker, resident = held.get(name, (None, None))
        if resident is None:
            status = "available"
        elif resident.state in (SERVING, DRAINING):
            status = SERVING
        elif resident.state in (SUSPENDED, SUSPENDING):
            status = SUSPENDED
        else:
            status = LOADING
        where = ("serving" if resident is not None and status != LOADING
                 else "device" if name in parked else "host" if name in cached else "disk")
        if worker is None and name in parked:
            worker = parked[name][0]
        size = (resident.bytes if resident is not None and resident.bytes else
                parked[name][1] if where == "device" else cached.get(name))
        views.append({"name": name, "path": entry.path, "state": status, "worker": worker,
                      "bytes": size or entry.disk_bytes(), "where": where,
                      "configured": entry.configured,
                      "active": resident.active if resident else 0,
                      "waiting": sum(w.entry.name == name for w in state.waiters.values())})
    return views


def status_line(state: State) -> str:
    ready = sum(w.phase == READY for w in state.workers)
    serving = ", ".join(n for w in state.workers for n, r in w.residents.items()
                        if r.state == SERVING) or "nothing"
    return f"workers {ready}/{len(state.workers)} ready; serving {serving}"


def resident(state: State) -> list[dict]:
    """Every resident model with its worker, state, footprint, requests in
    flight (leases) and requests waiting for it."""
    waiting = waiting_by_model(state)
    return [{"worker": w.index, "model": r.name, "state": r.state, "bytes": r.bytes,
             "running": r.active, "waiting": waiting.get(r.name, 0), "kv_usage": r.kv_usage,
             "cache_config": r.cache_config}
            for w in state.workers for r in w.residents.values()
            if r.state in (SERVING, DRAINING, SUSPENDED)]


def cached_bytes(state: State) -> int:
    return sum(sum(w.cached.values()) for w in state.workers)


def waiting_by_model(state: State) -> dict[str, int]:
    counts: dict[str, int] = {}
    for waiter in state.waiters.values():
        counts[waiter.entry.name] = counts.get(waiter.entry.name, 0) + 1
    return counts


