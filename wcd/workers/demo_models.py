"""Generate small Llama-architecture demo models, locally, with no model hub.

    python -m wcd.workers.demo_models DIR [--names small-a,small-b,wide-a,embed-a]
                                          [--share-layers]

Each model gets a byte-level BPE tokenizer trained here (bos/eos/pad and a chat
template) and random bf16 weights with head_dim 64 (vLLM's CPU attention needs
it; the 8B-class shapes, for CUDA, have their originals' 128). Models of one
shape differ only in their seed, so outputs tell them apart while a swap
between them stays on the same-shape path. An `embed` model is a
Llama without its LM head (`LlamaModel`, which vLLM serves with its pooling
runner) and a sentence-transformers pooling config: mean pooling, normalized.

With --share-layers (the GPU benchmarks' 8B-class models, ~14 GB each, where
six of them would not fit the device machine's disk), a model after the first
of its shape links that one's weight shards and draws only its own LM head,
which is enough for outputs to tell them apart: vLLM still reads, and wcd
still snapshots, every tensor of each.
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    embedding: bool = False  # no LM head; served by vLLM's pooling runner
    head_dim: int = 64  # vLLM's CPU attention needs 64


SHAPES = {
    "small": Shape(256, 512, 2, 4, 2),
    "wide": Shape(384, 768, 3, 6, 2),
    "embed": Shape(256, 512, 2, 4, 2, embedding=True),
    # GPU benchmarks (bench/gpu.py): ~1.5 GB and ~1.6 GB in bf16.
    "big": Shape(2048, 5504, 16, 32, 8),
    "bigwide": Shape(2560, 6912, 12, 40, 8),
    # 8B-class (WCD_BENCH_SIZE=8b, CUDA only): Llama-3.1-8B's and
    # Qwen2.5-7B's layers, head_dim 128 as theirs, ~14 and ~13 GB in bf16
    # with this vocabulary.
    "llama8b": Shape(4096, 14336, 32, 32, 8, head_dim=128),
    "qwen7b": Shape(3584, 18944, 28, 28, 4, head_dim=128),
}
# Wider than the usual 0.02, so greedy argmax is not decided by ties.
INIT_STD = 0.2
INDEX = "model.safetensors.index.json"
# Small shards, so that a --share-layers sibling rewrites only the one holding
# the LM head.
SHARD_SIZE = "2GB"
DEFAULT_NAMES = ("small-a", "small-b", "wide-a", "embed-a")
# sentence-transformers' module list, which vLLM reads for the pooling config
# (transformers_utils/config.py get_pooling_config): mean pooling, then
# normalize. Mean rather than vLLM's default for a Llama (last token), so that
# an embedding shows the model's own config was honoured.
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"},
]


def shape_of(name: str) -> Shape:
    """The shape is the name's prefix: 'small-b' is a 'small' model."""
    prefix = name.split("-", 1)[0]
    if prefix not in SHAPES:
        raise ValueError(f"model name {name!r} must start with one of {sorted(SHAPES)}")
    return SHAPES[prefix]


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def _corpus() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while warm workers keep models "
        "ready to serve every request swap load unload cache weights tokens in "
        "memory on device fast small wide model hello world what is your name "
        "please tell me a story about llamas and servers that never sleep"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    lines.extend(f"{i} + {i + 1} = {2 * i + 1}." for i in range(200))
    return lines


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def write_model(directory: Path, name: str, tokenizer) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaModel

    shape = shape_of(name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed_of(name))
    # Random init of a GPU-sized model takes minutes on a CPU, seconds on a GPU.
    architecture = LlamaModel if shape.embedding else LlamaForCausalLM
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = architecture(config).to(torch.bfloat16)
    out = directory / name
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(out)
    if shape.embedding:
        _write_pooling_config(out, shape)
    else:
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out)
    (out / "wcd-demo.json").write_text(json.dumps({"name": name, "seed": seed_of(name)}))
    return out


def write_sibling(directory: Path, name: str, base: str) -> Path:
    """`name` as `base` with its own LM head: the shard holding it is
    rewritten, every other shard is a link to base's."""
    import torch
    from safetensors.torch import load_file, save_file

    source, out = directory / base, directory / name
    if shape_of(name).embedding:
        raise ValueError(f"{name}: an embedding model has no LM head to draw")
    index = source / INDEX  # none when one file holds every tensor
    head_shard = (json.loads(index.read_text())["weight_map"]["lm_head.weight"]
                  if index.exists() else "model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        target = out / file.name
        target.unlink(missing_ok=True)
        if file.suffix == ".safetensors" and file.name != head_shard:
            target.symlink_to(Path("..") / base / file.name)
        elif file.suffix != ".safetensors" and file.name != "wcd-demo.json":
            target.write_bytes(file.read_bytes())
    tensors = load_file(source / head_shard)
    head = tensors["lm_head.weight"]
    generator = torch.Generator().manual_seed(seed_of(name))
    tensors["lm_head.weight"] = (torch.randn(head.shape, generator=generator) * INIT_STD
                                 ).to(head.dtype)
    save_file(tensors, out / head_shard, metadata={"format": "pt"})
    (out / "wcd-demo.json").write_text(json.dumps(
        {"name": name, "seed": seed_of(name), "layers_of": base}))
    return out


def _write_pooling_config(out: Path, shape: Shape) -> None:
    (out / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": shape.hidden_size, "pooling_mode_mean_tokens": True},
        indent=2))


def generate(directory: Path, names: list[str], share_layers: bool = False) -> list[Path]:
    for name in names:
        shape_of(name)  # fail before any work on a bad name
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    first_of_shape: dict[Shape, str] = {}
    paths = []
    for name in names:
        base = first_of_shape.setdefault(shape_of(name), name)
        if share_layers and base != name:
            paths.append(write_sibling(directory, name, base))
        else:
            paths.append(write_model(directory, name, tokenizer))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--names", default=",".join(DEFAULT_NAMES),
                        help="comma-separated; each starts with a shape: " + ", ".join(SHAPES))
    parser.add_argument("--share-layers", action="store_true",
                        help="models after the first of a shape share its weight shards "
                             "and draw their own LM head")
    args = parser.parse_args(argv)
    names = [n for n in args.names.split(",") if n]
    for path in generate(args.directory, names, args.share_layers):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
