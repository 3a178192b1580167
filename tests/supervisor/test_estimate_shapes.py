"""Attention shapes of config.json files from several families (transformers' attribute_map)."""

from __future__ import annotations

import pytest

from supervisor.model_shape import ModelShape, ShapeError, model_shape


def test_bloom_uses_n_layer_n_head_and_hidden_size():
    # bigscience/bloom-560m: ALiBi, no length key.
    bloom = {"model_type": "bloom", "n_layer": 24, "n_head": 16, "hidden_size": 1024}
    assert model_shape(bloom) == ModelShape(24, 16, 16, 64, 2048)


def test_mpt_uses_d_model_n_heads_n_layers_max_seq_len_and_kv_n_heads():
    mpt = {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
           "max_seq_len": 2048, "attn_config": {"kv_n_heads": 8}}  # fmt: skip
    assert model_shape(mpt) == ModelShape(32, 32, 8, 128, 2048)
    del mpt["attn_config"]
    assert model_shape(mpt).kv_heads == 32


def test_falcon_multi_query_defaults_on_and_new_architecture_reads_n_head_kv():
    old = {"model_type": "falcon", "n_layer": 32, "n_head": 71, "hidden_size": 4544}
    assert model_shape(old).kv_heads == 1, "FalconConfig's multi_query defaults to true"
    assert model_shape({**old, "multi_query": False}).kv_heads == 71
    new = {"model_type": "RefinedWeb", "n_layer": 60, "n_head": 128, "hidden_size": 8192,
           "new_decoder_architecture": True, "n_head_kv": 8, "multi_query": True}  # fmt: skip
    assert model_shape(new).kv_heads == 8, "falcon-40b: multi_query is ignored"


def test_gpt_bigcode_multi_query_is_one_kv_head():
    starcoder = {"model_type": "gpt_bigcode", "n_layer": 40, "n_head": 48, "n_embd": 6144,
                 "n_positions": 8192, "multi_query": True}  # fmt: skip
    assert model_shape(starcoder) == ModelShape(40, 48, 1, 128, 8192)


def test_head_dim_and_text_config_win():
    config = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "head_dim": 256, "hidden_size": 1024,
                              "max_position_embeddings": 8192, "seq_length": 4096}}  # fmt: skip
    assert model_shape(config) == ModelShape(2, 8, 2, 256, 4096), "smallest length key wins"


def test_a_missing_field_names_every_accepted_key():
    with pytest.raises(ShapeError, match="no num_hidden_layers or n_layer or n_layers"):
        model_shape({"num_attention_heads": 8, "hidden_size": 512})
