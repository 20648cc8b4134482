"""Keep one NCCL group across model loads, or re-create it: the cost a TP
worker group saves (torch only; for a multi-GPU device machine).

    python3 bench/nccl_group.py --out DIR [--gpus 2] [--loads 5] [--gib 1]
    python bench/nccl_group.py --report DIR     # BENCHMARKS.md section

Each of N processes owns one GPU, as a wcd TP group's ranks do. A "model
load" here is what a TP=N swap asks of the communicator: allocate this rank's
shard of the weights, then run the collectives a first forward runs (an
all-reduce of activations, an all-gather of logits). Two ways, timed per load
on every rank, in the same processes:
- reuse: the process group formed once stays (what wcd's group keeps);
- re-create: destroy the process group and form a new one (a new TCP store,
  NCCL communicator set-up at the first collective), as a process born for
  one model must.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## TP groups (bench/nccl_group.py)"


def _load(rank: int, world: int, gib: float) -> float:
    """One simulated model load and its first forward's collectives."""
    import torch
    import torch.distributed as dist

    started = time.perf_counter()
    shard = torch.empty(int(gib * (1 << 30)) // 2 // world, dtype=torch.bfloat16, device="cuda")
    shard.fill_(rank)
    activations = torch.ones(4096, 8192, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(activations)
    logits = torch.ones(32, 32000 // world, dtype=torch.float32, device="cuda")
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits)
    torch.cuda.synchronize()
    assert activations[0, 0].item() == world
    del shard, activations, logits, gathered
    return time.perf_counter() - started


def _rank_main(rank: int, world: int, loads: int, gib: float, ports: list[int], out: str):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    timings: dict[str, list[float]] = {"first_group_s": [], "reuse_s": [], "recreate_s": [],
                                       "recreate_init_s": []}
    t = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    init_s = time.perf_counter() - t
    timings["first_group_s"].append(init_s + _load(rank, world, gib))
    for _ in range(loads):
        dist.barrier()
        timings["reuse_s"].append(_load(rank, world, gib))
    for i in range(loads):
        dist.barrier()
        t = time.perf_counter()
        dist.destroy_process_group()
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{ports[i + 1]}",
                                rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        init = time.perf_counter() - t
        timings["recreate_init_s"].append(init)
        timings["recreate_s"].append(init + _load(rank, world, gib))
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(timings))


def run(out: Path, gpus: int, loads: int, gib: float) -> None:
    import socket

    import torch
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    ports = []
    for _ in range(loads + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    mp.spawn(_rank_main, args=(gpus, loads, gib, ports, str(out)), nprocs=gpus, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(gpus)]
    # A load is done when its slowest rank is.
    result = {key: [max(r[key][i] for r in ranks) for i in range(len(ranks[0][key]))]
              for key in ranks[0]}
    result.update(gpus=gpus, loads=loads, gib=gib, device=torch.cuda.get_device_name(0),
                  torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (out / "nccl-group.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def report(directory: Path) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_section

    r = json.loads((directory / "nccl-group.json").read_text())
    med = {k: statistics.median(r[k]) for k in ("reuse_s", "recreate_s", "recreate_init_s")}
    lines = [
        SECTION, "",
        f"Measured {r['date']} on {r['gpus']}× {r['device']} of one host, torch {r['torch']}, "
        f"NCCL {r['nccl']}. Command there: `python3 bench/nccl_group.py --out $OUT --gpus "
        f"{r['gpus']} --loads {r['loads']} --gib {r['gib']}`; here `python bench/nccl_group.py "
        "--report DIR`. Torch only (no vLLM on that machine): each of "
        f"{r['gpus']} processes owns a GPU; a simulated TP={r['gpus']} model load allocates "
        f"its shard of {r['gib']} GiB of weights and runs a first forward's collectives (an "
        "all-reduce of 4096×8192 bf16 activations, an all-gather of logits). Times are the "
        "slowest rank's, per load.", "",
        "| one model load | p50 (s) | all (s) |", "| --- | ---: | --- |",
        f"| first in a fresh group (NCCL set-up included) | {r['first_group_s'][0]:.3f} | |",
        f"| **reusing the group** (what wcd's TP group does) | {med['reuse_s']:.4f} | "
        f"{', '.join(f'{v:.4f}' for v in r['reuse_s'])} |",
        f"| re-creating the group | {med['recreate_s']:.3f} | "
        f"{', '.join(f'{v:.3f}' for v in r['recreate_s'])} |",
        f"| of which destroy + init_process_group | {med['recreate_init_s']:.3f} | |", "",
        f"Re-creating the communicator costs {med['recreate_s'] - med['reuse_s']:.3f} s more "
        f"per load ({med['recreate_s'] / med['reuse_s']:.0f}× the reuse); a process born for "
        "one model pays that and its interpreter, torch import and CUDA context on top.", "",
    ]
    write_section(ROOT / "BENCHMARKS.md", SECTION, "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    if args.report:
        report(args.report)
    else:
        # NVLink multicast stays off (the device machines' rule: it can take
        # a shared host's GPUs out of service).
        os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                          NVSHMEM_DISABLE_NVLS="1")
        run(args.out, args.gpus, args.loads, args.gib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
