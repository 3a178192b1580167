"""Hugging Face model folders for tests: a real config.json and safetensors *headers* (the
tensor data is left out: sem only ever reads the headers)."""

from __future__ import annotations

import json
import math
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


def linear(name: str, out: int, inp: int, dtype: str, quant: str | None = None) -> Tensors:
    """One linear layer's tensors as a checkpoint of that kind stores them (weight: [out, in]).

    gptq: qweight int32 [in/8, out] (eight 4-bit values a word), qzeros int32 [in/128, out/8],
    scales [in/128, out], g_idx int32 [in]; awq: qweight int32 [in, out/8], qzeros, scales;
    fp8: weight float8_e4m3 [out, in] with float32 weight_scale and input_scale scalars.
    """
    group = 128
    if quant == "gptq":
        return {name + ".qweight": ("I32", [inp // 8, out]),
                name + ".qzeros": ("I32", [inp // group, out // 8]),
                name + ".scales": (dtype, [inp // group, out]),
                name + ".g_idx": ("I32", [inp])}  # fmt: skip
    if quant == "awq":
        return {name + ".qweight": ("I32", [inp, out // 8]),
                name + ".qzeros": ("I32", [inp // group, out // 8]),
                name + ".scales": (dtype, [inp // group, out])}  # fmt: skip
    if quant == "fp8":
        return {name + ".weight": ("F8_E4M3", [out, inp]),
                name + ".weight_scale": ("F32", []),
                name + ".input_scale": ("F32", [])}  # fmt: skip
    return {name + ".weight": (dtype, [out, inp])}


def llama_tensors(
    config: dict[str, int], dtype: str, quant: str | None = None, experts: int = 0
) -> Tensors:
    """Llama's tensors (Mixtral's with `experts`): embeddings, lm_head and norms stay `dtype`."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    tensors: Tensors = {"model.embed_tokens.weight": (dtype, [v, h]),
                        "lm_head.weight": (dtype, [v, h]),
                        "model.norm.weight": (dtype, [h])}  # fmt: skip
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {p + "input_layernorm.weight": (dtype, [h]),
                    p + "post_attention_layernorm.weight": (dtype, [h])}  # fmt: skip
        for proj, out, inp in (("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h)):
            tensors |= linear(f"{p}self_attn.{proj}_proj", out, inp, dtype, quant)
        if experts:
            tensors[p + "block_sparse_moe.gate.weight"] = (dtype, [experts, h])
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                for w, out, inp in (("w1", i, h), ("w2", h, i), ("w3", i, h)):
                    tensors |= linear(q + w, out, inp, dtype, quant)
            continue
        for proj, out, inp in (("gate", i, h), ("up", i, h), ("down", h, i)):
            tensors |= linear(f"{p}mlp.{proj}_proj", out, inp, dtype, quant)
    return tensors


Tensors = dict[str, tuple[str, list[int]]]  # name -> (safetensors dtype, shape)
_ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "F8_E4M3": 1}


def write_checkpoint(
    folder: Path, config: dict[str, object], shards: int = 1, tensors: Tensors | None = None
) -> Path:
    """config.json and `shards` safetensors files holding only their headers (no data)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = llama_tensors(config, _ST_DTYPE[str(config["torch_dtype"])])  # type: ignore[arg-type]
    items = list(tensors.items())
    for shard in range(shards):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in items[shard::shards]:
            nbytes = math.prod(shape) * _ST_BYTES[dtype]
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


LLAMA2_7B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008,
             "vocab": 32000, "max_positions": 4096}  # fmt: skip


def llama2_7b_fp32(folder: Path) -> Path:
    """A float32 fine-tune of Llama-2-7B: 27 GB on disk, served in 16 bits under dtype auto."""
    return write_checkpoint(folder, llama_config(**LLAMA2_7B, dtype="float32"), shards=3)


def llama2_7b_quantized(folder: Path, method: str) -> Path:
    """Llama-2-7B as TheBloke's 4-bit GPTQ/AWQ releases store it (group size 128, float16)."""
    config = llama_config(**LLAMA2_7B, dtype="float16")
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    return write_checkpoint(folder, config, tensors=llama_tensors(config, "F16", method))  # type: ignore[arg-type]


def llama3_8b_fp8(folder: Path) -> Path:
    """Meta-Llama-3-8B-Instruct-FP8's layout: FP8 linear weights, bfloat16 embeddings."""
    config = llama_config(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                          vocab=128256, max_positions=8192, dtype="bfloat16")  # fmt: skip
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    return write_checkpoint(folder, config, tensors=llama_tensors(config, "BF16", "fp8"))  # type: ignore[arg-type]


def mixtral_8x7b(folder: Path) -> Path:
    """Mixtral-8x7B: 8 experts of 3 matrices in each of 32 layers, 46.7 B parameters."""
    config = llama_config(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                          vocab=32000, max_positions=32768, dtype="bfloat16")  # fmt: skip
    config |= {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
               "num_local_experts": 8, "num_experts_per_tok": 2}  # fmt: skip
    tensors = llama_tensors(config, "BF16", experts=8)  # type: ignore[arg-type]
    return write_checkpoint(folder, config, shards=4, tensors=tensors)


def falcon_7b(folder: Path) -> Path:
    """tiiuae/falcon-7b (RefinedWeb keys): n_layer/n_head, multi-query, tied lm_head."""
    h, layers, heads, vocab = 4544, 32, 71, 65024
    config = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": h,
              "n_layer": layers, "n_head": heads, "multi_query": True, "parallel_attn": True,
              "new_decoder_architecture": False, "bias": False, "vocab_size": vocab,
              "torch_dtype": "bfloat16"}  # fmt: skip
    head_dim = h // heads
    tensors: Tensors = {"transformer.word_embeddings.weight": ("BF16", [vocab, h]),
                        "transformer.ln_f.weight": ("BF16", [h]),
                        "transformer.ln_f.bias": ("BF16", [h])}  # fmt: skip
    for n in range(layers):
        p = f"transformer.h.{n}."
        tensors |= {
            p + "input_layernorm.weight": ("BF16", [h]), p + "input_layernorm.bias": ("BF16", [h]),
            p + "self_attention.query_key_value.weight": ("BF16", [(heads + 2) * head_dim, h]),
            p + "self_attention.dense.weight": ("BF16", [h, h]),
            p + "mlp.dense_h_to_4h.weight": ("BF16", [4 * h, h]),
            p + "mlp.dense_4h_to_h.weight": ("BF16", [h, 4 * h]),
        }  # fmt: skip
    return write_checkpoint(folder, config, shards=2, tensors=tensors)


def gpt2(folder: Path) -> Path:
    """openai-community/gpt2 (124 M): GPT-2 keys, float32, and no torch_dtype in config.json."""
    h, layers, ctx, vocab = 768, 12, 1024, 50257
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": h,
              "n_head": 12, "n_layer": layers, "n_positions": ctx, "vocab_size": vocab}  # fmt: skip
    tensors: Tensors = {"wte.weight": ("F32", [vocab, h]), "wpe.weight": ("F32", [ctx, h]),
                        "ln_f.weight": ("F32", [h]), "ln_f.bias": ("F32", [h])}  # fmt: skip
    for n in range(layers):
        p = f"h.{n}."
        for norm in ("ln_1", "ln_2"):
            tensors |= {f"{p}{norm}.weight": ("F32", [h]), f"{p}{norm}.bias": ("F32", [h])}
        for name, inp, out in (("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h),
                               ("mlp.c_fc", h, 4 * h), ("mlp.c_proj", 4 * h, h)):  # fmt: skip
            tensors |= {f"{p}{name}.weight": ("F32", [inp, out]), f"{p}{name}.bias": ("F32", [out])}
    return write_checkpoint(folder, config, tensors=tensors)
