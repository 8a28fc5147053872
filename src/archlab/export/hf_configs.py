"""The transformers config of each exportable form (and the checks a form adds once selected).

``hf_forms.FORMS_TABLE`` names these per form; each builds the transformers config that
describes the archlab model exactly, from the config values every form shares (``common``).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig


def _gpt2_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    return tf.GPT2Config(
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len,
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        **common,
    )


def _llama_shape(cfg: ModelConfig, intermediate: int, common: dict[str, Any]) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.d_model,
        intermediate_size=intermediate,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        rope_theta=10000.0,
        **common,
    )


def _llama_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    shape = _llama_shape(cfg, cfg.ffn_hidden, common)
    return tf.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **shape)


def _mixtral_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    return tf.MixtralConfig(
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.aux_loss_coef,
        router_jitter_noise=0.0,
        sliding_window=None,
        **_llama_shape(cfg, cfg.expert_ffn_hidden, common),
    )


def _mamba_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    return tf.MambaConfig(
        hidden_size=cfg.d_model,
        state_size=cfg.state_size,
        num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps,
        expand=cfg.expand,
        conv_kernel=cfg.conv_size,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        time_step_rank=cfg.resolved_dt_rank,
        residual_in_fp32=True,
        **common,
    )


def _olmo_hybrid_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    from ..models.gdn import is_attention_layer, key_head_dim

    kinds = ("full_attention", "linear_attention")
    shape = _llama_shape(cfg, cfg.ffn_hidden, common)
    del shape["head_dim"], shape["rope_theta"]  # OLMo-hybrid: d_model / heads, rope_parameters
    return tf.OlmoHybridConfig(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=[kinds[not is_attention_layer(cfg, i)] for i in range(cfg.n_layers)],
        linear_num_key_heads=cfg.n_heads,
        linear_num_value_heads=cfg.n_heads,
        linear_key_head_dim=key_head_dim(cfg),
        linear_value_head_dim=cfg.gdn_expand_v * key_head_dim(cfg),
        linear_conv_kernel_dim=cfg.conv_size,
        linear_allow_neg_eigval=False,
        **shape,
    )


def _olmo_hybrid_check(cfg: ModelConfig) -> str | None:
    if cfg.gdn_attention_every == 0:
        return (
            "gdn without attention layers: OlmoHybridForCausalLM needs at least one "
            "full-attention layer (train with --gdn-attention-every K, e.g. 4)"
        )
    return None


def _mamba2_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    import transformers as tf

    return tf.Mamba2Config(
        hidden_size=cfg.d_model,
        num_heads=cfg.d_inner // cfg.ssd_head_dim,
        head_dim=cfg.ssd_head_dim,
        n_groups=cfg.ssd_groups,
        state_size=cfg.state_size,
        num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps,
        expand=cfg.expand,
        conv_kernel=cfg.conv_size,
        chunk_size=cfg.ssd_chunk_size,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        time_step_limit=(0.0, float("inf")),
        residual_in_fp32=True,
        **common,
    )


def _mixtral_check(cfg: ModelConfig) -> str | None:
    if cfg.bias:
        return "moe with biases: Mixtral's linears have none"
    if cfg.top_k < 2:
        return (
            "moe with top-k 1 uses the Switch gate (raw probability); Mixtral renormalises "
            "the top-k gates, which for k = 1 is always 1"
        )
    return None
