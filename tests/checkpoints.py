"""Hugging Face model folders for tests: a real config.json and safetensors *headers* (the
tensor data is left out: sem only ever reads the headers)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def llama_config(
    *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
    max_positions: int, dtype: str,
) -> dict[str, object]:  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
        "vocab_size": vocab, "max_position_embeddings": max_positions, "torch_dtype": dtype,
    }  # fmt: skip


def llama_tensors(config: dict[str, int], dtype: str) -> dict[str, tuple[str, list[int]]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": (dtype, [v, h]), "lm_head.weight": (dtype, [v, h]),
               "model.norm.weight": (dtype, [h])}  # fmt: skip
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            p + "self_attn.q_proj.weight": (dtype, [h, h]),
            p + "self_attn.k_proj.weight": (dtype, [kv, h]),
            p + "self_attn.v_proj.weight": (dtype, [kv, h]),
            p + "self_attn.o_proj.weight": (dtype, [h, h]),
            p + "mlp.gate_proj.weight": (dtype, [i, h]),
            p + "mlp.up_proj.weight": (dtype, [i, h]),
            p + "mlp.down_proj.weight": (dtype, [h, i]),
            p + "input_layernorm.weight": (dtype, [h]),
            p + "post_attention_layernorm.weight": (dtype, [h]),
        }
    return tensors


def write_checkpoint(folder: Path, config: dict[str, object], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    st_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[str(config["torch_dtype"])]
    tensors = list(llama_tensors(config, st_dtype).items())  # type: ignore[arg-type]
    for shard in range(shards):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in tensors[shard::shards]:
            size = 1
            for dim in shape:
                size *= dim
            nbytes = size * (4 if dtype == "F32" else 2)
            header[name] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header).encode()
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        (folder / name).write_bytes(struct.pack("<Q", len(blob)) + blob)
    return folder


def tiny_llama(folder: Path) -> Path:
    """Shaped like the demo models (hidden 128, 2 layers, head_dim 64, float32)."""
    return write_checkpoint(folder, llama_config(
        hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=1024,
        max_positions=2048, dtype="float32"))  # fmt: skip


def llama2_7b(folder: Path) -> Path:
    """Llama-2-7B's real shapes: 6.74 B parameters, 13.5 GB in float16."""
    return write_checkpoint(folder, llama_config(
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
        max_positions=4096, dtype="float16"), shards=2)  # fmt: skip
