"""Unit tests of the demo model generator's --share-layers siblings (the GPU
benchmarks' 8B-class models): files and tensors, no engine."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from wcd.workers import demo_models
from wcd.workers.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def siblings(tmp_path_factory):
    directory = tmp_path_factory.mktemp("siblings")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_models, "SHARD_SIZE", "300KB")  # several shards, as an 8B model has
        demo_models.generate(directory, ["small-a", "small-b"], share_layers=True)
    return directory


def tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_a_sibling_links_every_shard_but_the_one_with_its_lm_head(siblings):
    index = json.loads((siblings / "small-a" / demo_models.INDEX).read_text())
    head_shard = index["weight_map"]["lm_head.weight"]
    shards = sorted(p.name for p in (siblings / "small-b").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    for name in shards:
        file = siblings / "small-b" / name
        if name == head_shard:
            assert not file.is_symlink()
        else:
            assert file.resolve() == (siblings / "small-a" / name).resolve()


def test_a_sibling_differs_from_its_base_in_the_lm_head_alone(siblings):
    base, sibling = tensors(siblings / "small-a"), tensors(siblings / "small-b")
    assert base.keys() == sibling.keys()
    differing = {n for n in base if not base[n].equal(sibling[n])}
    assert differing == {"lm_head.weight"}
    assert sibling["lm_head.weight"].dtype == base["lm_head.weight"].dtype
    # drawn as the model's own init draws it, so greedy outputs stay decisive
    assert 0.15 < sibling["lm_head.weight"].float().std().item() < 0.25


def test_a_sibling_is_a_checkpoint_of_its_own_beneath_the_model_root(siblings):
    base = open_checkpoint(siblings / "small-a", root=str(siblings))
    sibling = open_checkpoint(siblings / "small-b", root=str(siblings))
    assert sibling.layout == base.layout
    assert sibling.shape_key({}) == base.shape_key({})
    assert sibling.weights_key != base.weights_key
