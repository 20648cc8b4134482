"""How long pinning the host cache's buffer stalls the worker's other CUDA calls.

    python bench/pin_memory.py [--gib 8,24]

CUDA only; torch and wcd's weights module (the device recipe's PYTHONPATH,
as bench/gpu.py runs). For each size: the buffer pinned as wcd's host cache
pins it (pages faulted in, then weights.register_with_cuda) on a thread,
while the main thread calls torch.cuda.mem_get_info every 20 ms, as a
worker's first load would; the longest call is the stall. Then copy rates
both ways, and torch's own pinned allocation (cudaHostAlloc) of the same
size, the way before, as the baseline in the same run.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from wcd.workers.weights import register_with_cuda

GiB = 1 << 30


def pin(buffer: torch.Tensor) -> None:
    """As the host cache's pool does, in one piece: fault in, then register."""
    buffer.fill_(0)
    register_with_cuda(buffer)


def stall_while(work) -> tuple[float, float]:
    """(seconds `work` took on a thread, the longest CUDA call meanwhile)."""
    took, stalls = [], [0.0]

    def timed() -> None:
        started = time.perf_counter()
        work()
        took.append(time.perf_counter() - started)

    thread = threading.Thread(target=timed)
    thread.start()
    while thread.is_alive():
        started = time.perf_counter()
        torch.cuda.mem_get_info()
        stalls.append(time.perf_counter() - started)
        time.sleep(0.02)
    thread.join()
    return took[0], max(stalls)


def copy_rate(dst: torch.Tensor, src: torch.Tensor) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.numel() / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", default="8,24")
    args = parser.parse_args()
    torch.zeros(1, device="cuda")
    device = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    for gib in map(int, args.gib.split(",")):
        buffer = torch.empty(gib * GiB, dtype=torch.uint8)
        seconds, stall = stall_while(lambda: pin(buffer))
        h2d = copy_rate(device, buffer[:4 * GiB])
        d2h = copy_rate(buffer[:4 * GiB], device)
        print(f"{gib} GiB, wcd's way: pinned in {seconds:.2f} s, other CUDA calls waited up to "
              f"{stall:.3f} s; H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s")
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        buffer = None  # freed before the baseline's allocation
        seconds, stall = stall_while(
            lambda: torch.empty(gib * GiB, dtype=torch.uint8, pin_memory=True))
        print(f"{gib} GiB, torch's pinned allocation: {seconds:.2f} s, other CUDA calls waited "
              f"up to {stall:.3f} s")


if __name__ == "__main__":
    main()
