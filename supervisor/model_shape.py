"""The attention shape of a model from its config.json: layers, heads, KV heads, head size, length.

Families name the same fields differently; transformers maps them with each config class's
`attribute_map`. sem's environment has no transformers, so the maps it needs are copied here as
plain data, each with the class it comes from (transformers 5.19, read in its source):

    GPT2Config, GPTBigCodeConfig, GPTJConfig, CodeGenConfig:
        hidden_size <- n_embd, num_attention_heads <- n_head, num_hidden_layers <- n_layer,
        max_position_embeddings <- n_positions
    BloomConfig:  num_hidden_layers <- n_layer, num_attention_heads <- n_head
    MptConfig:    hidden_size <- d_model, num_attention_heads <- n_heads,
                  num_hidden_layers <- n_layers
    DbrxConfig:   as MptConfig, and max_position_embeddings <- max_seq_len
    vLLM's RWConfig (vllm/transformers_utils/configs/falcon.py, the "RefinedWeb" falcons):
                  num_hidden_layers <- n_layer, num_attention_heads <- n_head,
                  num_kv_heads <- n_head_kv

KV heads follow vLLM 0.32 (vllm/transformers_utils/model_arch_config_convertor.py
`get_total_num_kv_heads`; vllm/model_executor/models/falcon.py `FalconAttention`):
falcon with `new_decoder_architecture` uses `num_kv_heads`; otherwise falcon with `multi_query`
(transformers' FalconConfig default: true) and GPT-BigCode with `multi_query` have one KV head;
MPT/DBRX read `attn_config.kv_n_heads`; else the first of n_head_kv, num_kv_heads,
num_key_value_heads, multi_query_group_num, num_attention_groups; else every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("n_layer", "n_layers"),
    "num_attention_heads": ("n_head", "n_heads"),
    "hidden_size": ("n_embd", "d_model"),
    "num_kv_heads": ("n_head_kv",),
}
# vLLM's max_model_len keys, smallest wins (model_arch_config_convertor.py
# `derive_max_model_len_and_key`); none: vLLM's default of 2048.
_LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip
_DEFAULT_MAX_LEN = 2048
_KV_HEAD_KEYS = (
    "n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num",
    "num_attention_groups",
)  # fmt: skip
_FALCON_TYPES = frozenset({"falcon", "RefinedWeb", "RefinedWebModel"})


class ShapeError(ValueError):
    """config.json lacks a field the shape needs; the message names it."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int  # vLLM's derived max_model_len when the spec sets none


def _get(config: dict[str, Any], key: str) -> Any:
    """config[key], or its first alias present (transformers' attribute_map semantics)."""
    for name in (key, *_ALIASES.get(key, ())):
        if config.get(name) is not None:
            return config[name]
    return None


def _require(config: dict[str, Any], key: str) -> int:
    value = _get(config, key)
    if value is None:
        names = " or ".join((key, *_ALIASES.get(key, ())))
        raise ShapeError(f"config.json has no {names}")
    return int(value)


def _kv_heads(config: dict[str, Any], heads: int) -> int:
    model_type = str(config.get("model_type", ""))
    if model_type in _FALCON_TYPES:
        if config.get("new_decoder_architecture"):
            return int(_get(config, "num_kv_heads") or heads)
        if config.get("multi_query", True):
            return 1
        return heads
    if model_type == "gpt_bigcode" and config.get("multi_query"):
        return 1
    attn_config = config.get("attn_config")
    if model_type in ("mpt", "dbrx") and isinstance(attn_config, dict):
        return int(attn_config.get("kv_n_heads") or heads)
    for key in _KV_HEAD_KEYS:
        if config.get(key) is not None:
            return int(config[key])
    return heads


def _max_positions(config: dict[str, Any]) -> int:
    found = [int(config[key]) for key in _LENGTH_KEYS if config.get(key) is not None]
    return min(found) if found else _DEFAULT_MAX_LEN


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of the text model (a multimodal config's `text_config` when it has one)."""
    config = config.get("text_config") or config
    layers = _require(config, "num_hidden_layers")
    heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim")
    if not head_dim:
        head_dim = _require(config, "hidden_size") // heads
    return ModelShape(
        layers=layers,
        heads=heads,
        kv_heads=_kv_heads(config, heads),
        head_dim=int(head_dim),
        max_positions=_max_positions(config),
    )
