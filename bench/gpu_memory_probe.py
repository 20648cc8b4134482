"""What stays allocated on CUDA after wcd releases engines (device only).

    python3 bench/gpu_memory_probe.py big-a,bigwide-a '{"enforce_eager": true}'

Builds each model in turn in wcd's EngineHost (models from bench/gpu.py's
directory), releases it, and prints torch.cuda.memory_allocated after each
step, then every live CUDA tensor and every block still allocated, with the
vLLM/wcd frames that allocated it (the allocator's history). This is how the
gc-freeze and cuBLAS-workspace holders in BENCHMARKS.md were found.
"""
import gc, os, sys, collections, json
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch

def main():
    from wcd.workers import vllm_seams, protocol as p
    from wcd.workers.engine import EngineHost, PhaseClock
    from wcd.workers.weights import HostCache
    vllm_seams.apply(); torch.cuda.init(); torch.cuda.set_device(0); vllm_seams.freeze_import_heap()
    print("baseline", torch.cuda.memory_allocated(), hasattr(torch._C, "_cuda_clearCublasWorkspaces"))
    torch.cuda.memory._record_memory_history(max_entries=200000)
    host = EngineHost(HostCache(0, pinned=True))
    args = {"dtype": "bfloat16", "max_model_len": 1024, "kv_cache_memory_bytes": 2 << 30,
            "gpu_memory_utilization": 0.5, "seed": 0, **json.loads(sys.argv[2])}
    from vllm.v1.engine.llm_engine import LLMEngine
    for name in sys.argv[1].split(","):
        eager = name.endswith("+eager")
        name = name.removesuffix("+eager")
        spec = p.ModelSpec(name, f"/tmp/wcd-gpu-models/{name}", {**args, "enforce_eager": eager})
        host.swap(spec, PhaseClock(lambda *a: None), lambda: None)
        gc.collect()
        engines = [o for o in gc.get_objects() if isinstance(o, LLMEngine)]
        print("serving", name, "eager" if eager else "graphs", torch.cuda.memory_allocated(),
              "engines alive", len(engines))
        for old in (e for e in engines if e is not host.served.engine):
            for r in gc.get_referrers(old):
                if r is not engines:
                    print("  old engine held by", type(r).__name__, str(r)[:200])
        del engines
    host.release()
    print("after release", torch.cuda.memory_allocated())
    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
    print("live cuda tensors", len(live), sum(t.untyped_storage().nbytes() for t in live))
    for t in sorted(live, key=lambda t: -t.untyped_storage().nbytes())[:8]:
        refs = [type(r).__name__ for r in gc.get_referrers(t)][:5]
        print("  tensor", tuple(t.shape), t.dtype, t.untyped_storage().nbytes(), refs)
    snap = torch.cuda.memory._snapshot()
    blocks = collections.Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']}:{f['name']}" for f in b.get("frames", []) if "vllm" in f["filename"] or "wcd" in f["filename"]][:4]
                blocks[" <- ".join(frames) or "?"] += b["size"]
    for where, size in blocks.most_common(12):
        print(f"  {size/2**20:9.1f} MiB  {where}")

if __name__ == "__main__":
    main()
