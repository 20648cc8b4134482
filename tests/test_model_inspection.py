"""A worker inspects a model class vLLM has not cached in its own process
(vllm_seams seam 23), against vLLM's real registry: on a fresh H200 machine
vLLM's subprocess for it took 17-24 s of a first load."""

from __future__ import annotations

import subprocess

from vllm.model_executor.models import registry

from wcd.workers import vllm_seams


def test_an_uncached_model_class_is_inspected_without_a_subprocess(tmp_path, monkeypatch):
    vllm_seams.apply()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    started = []
    monkeypatch.setattr(registry.subprocess, "run",
                        lambda *args, **kwargs: started.append(args) or subprocess.run(
                            ["false"], check=True))
    model = registry._LazyRegisteredModel(module_name="vllm.model_executor.models.llama",
                                          class_name="LlamaForCausalLM")
    assert not list(tmp_path.rglob("*.json"))  # vLLM's cache misses

    info = model.inspect_model_cls()

    assert started == []
    assert info.architecture == "LlamaForCausalLM" and info.is_text_generation_model
    # vLLM still caches what it learnt, for its own processes too
    assert [p.name for p in (tmp_path / "modelinfos").iterdir()] == [
        "vllm-model_executor-models-llama-LlamaForCausalLM.json"]
