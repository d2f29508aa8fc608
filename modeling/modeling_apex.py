"""Apex: a hybrid Mixture-of-Experts + iterative-refinement decoder, as a transformers 5 model.

The file reads top to bottom: norm -> rope -> attention (GQA, MLA) -> dense MLP -> experts -> router -> MoE block ->
decoder layer -> refinement (verifier + spiral memory, input injection) -> model -> multi-token prediction ->
causal-LM head.

Physical stack: `num_prelude_layers` -> `num_core_layers` run K times -> `num_coda_layers`. Each pass of the core is
one *unrolled* layer: it owns its own KV-cache slot (`cache_index`) and `layer_types` entry, so transformers'
`DynamicCache(config=...)` and `StaticCache` size themselves from `num_hidden_layers` with no special cache class.

This file is copied verbatim to the Hub by `save_pretrained`: it imports only torch, transformers and its sibling
`configuration_apex.py`.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_apex import ApexConfig


logger = logging.get_logger(__name__)


try:  # transformers >= 5.23
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.17 - 5.22 inline the same slicing in every head

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


def _grouped_linear_in_torch(
    input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers' `_grouped_linear` in plain torch: rows `offs[e - 1]:offs[e]` of `input` (sorted by expert)
    through expert e's `weight[e]` ([out, in]), plus a per-row `bias`."""
    ends = offs.tolist()
    rows = input.to(weight.dtype)
    out = torch.cat([rows[start:end] @ weight[e].T for e, (start, end) in enumerate(zip([0, *ends], ends))])
    return out if bias is None else out + bias


try:  # private to transformers (its dispatch to torch's grouped GEMM), so a version Hub users run may lack it
    from transformers.integrations.moe import _grouped_linear
except ImportError:
    _grouped_linear = _grouped_linear_in_torch


# transformers 5.25 renamed the cache from `past_key_values` to `cache`, in model forwards and in output classes (the
# old name stays deprecated until 5.40). Hub users run whatever version they have: Apex takes the cache under either
# name, returns it under the installed version's name (where `generate` looks for it) and hands it to its decoder
# layers under that name too (where `GradientCheckpointingLayer` drops it while recomputing).
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# The keywords a forward takes beyond its named arguments: transformers' own (attention backends, output flags, loss
# normalisation) and the loss function's `shift_labels`. Any other keyword is an error: swallowed by `**kwargs`, a
# renamed argument (as the cache was in 5.25) would silently do nothing.
ACCEPTED_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"shift_labels"}


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Pass the KV cache as `cache` or as `past_key_values` (its name before transformers 5.25), not both"
        )
    return cache if cache is not None else past_key_values


def is_training_forward(module: nn.Module) -> bool:
    """A forward that trains: train mode with gradients. The loop recipe and the routers' load balancing apply to it
    only, never in eval and never without gradients (generation inside a trainer, e.g. GRPO's rollouts, runs the model
    in train mode under no_grad)."""
    return module.training and torch.is_grad_enabled()


def check_forward_kwargs(forward_owner: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - ACCEPTED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(
            f"{forward_owner}.forward() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; besides "
            f"its named arguments it takes only transformers' keywords: {', '.join(sorted(ACCEPTED_FORWARD_KWARGS))}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Auxiliary losses that survive trainers which run only the backbone


class AuxLossAutoScaler(torch.autograd.Function):
    """Returns `activation` unchanged and, in backward, gives `aux_loss` a gradient of 1 (Megatron-LM's
    MoEAuxLossAutoScaler). Attaching a weighted auxiliary loss to an activation on the path to the main loss makes it
    train whatever computes that main loss — TRL's trainers run only `ApexModel` and their own LM head, so a loss added
    in `ApexForCausalLM.forward` would be silently dropped there."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return activation

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss)


def attach_aux_loss(activation: torch.Tensor, weighted_loss: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and weighted_loss.requires_grad):
        return activation
    return AuxLossAutoScaler.apply(activation, weighted_loss)


# --------------------------------------------------------------------------------------------------------------------
# Norm and rotary embedding


class ApexRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class ApexRotaryEmbedding(nn.Module):
    """RoPE cos / sin. With `rope_parameters` given per layer type (Gemma 3: local and global layers rotate with
    different bases) it keeps one set of frequencies per type, named as transformers' Gemma 3 names them, and
    `forward` takes the layer type; otherwise there is one set and `layer_type` is `None`."""

    def __init__(self, config: ApexConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        layer_types = sorted(set(config.layer_types)) if config.rope_per_layer_type else [None]
        self.rope_type = {}
        for layer_type in layer_types:
            self.rope_type[layer_type] = config.rope_parameters_of(layer_type).get("rope_type", "default")
            inv_freq, attention_scaling = self.frequencies(layer_type)
            prefix = "" if layer_type is None else f"{layer_type}_"
            setattr(self, f"{prefix}inv_freq", nn.Buffer(inv_freq, persistent=False))
            setattr(self, f"{prefix}original_inv_freq", nn.Buffer(inv_freq.clone(), persistent=False))
            setattr(self, f"{prefix}attention_scaling", attention_scaling)
        if layer_types == [None]:
            self.rope_type = self.rope_type[None]

    def frequencies(self, layer_type: str | None) -> tuple[torch.Tensor, float]:
        """`(inv_freq, attention_scaling)` of a layer type (`None`: the one shared set)."""
        rope_type = self.config.rope_parameters_of(layer_type).get("rope_type", "default")
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
        return rope_init_fn(self.config, **({} if layer_type is None else {"layer_type": layer_type}))

    @staticmethod
    def compute_default_rope_parameters(
        config: ApexConfig, device=None, layer_type: str | None = None, **kwargs
    ) -> tuple[torch.Tensor, float]:
        """Plain RoPE over the first `partial_rotary_factor` of each head (`head_dim` is the rope size for MLA)."""
        rope_parameters = config.rope_parameters_of(layer_type)
        dim = int(config.head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids, layer_type: str | None = None):
        prefix = "" if layer_type is None else f"{layer_type}_"
        inv_freq = getattr(self, f"{prefix}inv_freq")
        attention_scaling = getattr(self, f"{prefix}attention_scaling")
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """RoPE on the leading `cos.shape[-1]` channels of each head; the rest pass through (partial rotary)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)
    k_embed = torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)
    return q_embed, k_embed


# --------------------------------------------------------------------------------------------------------------------
# Attention


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    if s_aux is not None:  # attention sinks: one extra logit per head whose value is zero, dropped after the softmax
        sinks = s_aux.reshape(1, -1, 1, 1).expand(*attn_weights.shape[:-1], 1).to(attn_weights.dtype)
        attn_weights = torch.cat((attn_weights, sinks), dim=-1)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)[..., :-1].to(query.dtype)
    else:
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ApexAttentionOutputGate(nn.Module):
    """Sigmoid gate on the attention output, from the layer input (Qwen3-Next gated attention): one gate per head
    (`headwise`) or per channel (`elementwise`). It lets a head output nothing, which removes attention sinks."""

    def __init__(self, config: ApexConfig, num_heads: int, head_dim: int):
        super().__init__()
        self.headwise = config.attention_output_gate == "headwise"
        gate_size = num_heads if self.headwise else num_heads * head_dim
        self.proj = nn.Linear(config.hidden_size, gate_size, bias=config.attention_bias)

    def forward(self, attn_output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.proj(hidden_states))
        if self.headwise:  # sizes from the tensors: under tensor parallelism `proj` and the heads are sharded alike
            gate = gate.repeat_interleave(attn_output.shape[-1] // gate.shape[-1], dim=-1)
        return attn_output * gate


class ApexAttention(nn.Module):
    """Grouped-query attention (MHA / MQA when kv heads = heads / 1), optional QK-norm, partial RoPE, attention
    sinks and output gate."""

    def __init__(self, config: ApexConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window_of(layer_idx)

        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias
        )
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads))
        if config.qk_norm:
            self.q_norm = ApexRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = ApexRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.attention_output_gate != "none":
            self.output_gate = ApexAttentionOutputGate(config, config.num_attention_heads, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        cache_index: int | None = None,
        exits: "RefinementExits | None" = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if exits is not None:
            key_states, value_states = exits.cache_update(self.layer_idx, key_states, value_states)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, cache_index)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            s_aux=getattr(self, "sinks", None),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if self.config.attention_output_gate != "none":
            attn_output = self.output_gate(attn_output, hidden_states)
        return self.o_proj(attn_output), attn_weights


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class ApexMLAttention(nn.Module):
    """DeepSeek multi-head latent attention. The cache holds the normed KV latent and the shared rotary key, not the
    per-head keys and values, which is what makes MLA's cache small."""

    def __init__(self, config: ApexConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1  # keys and values are expanded per head from the latent
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.sliding_window = config.sliding_window_of(layer_idx)

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = ApexRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = ApexRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_output_bias
        )
        if config.attention_output_gate != "none":
            self.output_gate = ApexAttentionOutputGate(config, self.num_heads, self.v_head_dim)

        self.scaling = self.qk_head_dim**-0.5
        rope_parameters = config.rope_parameters_of(config.physical("layer_types")[layer_idx])
        mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
        if rope_parameters.get("rope_type", "default") != "default" and mscale_all_dim:
            self.scaling *= yarn_get_mscale(rope_parameters["factor"], mscale_all_dim) ** 2

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        cache_index: int | None = None,
        exits: "RefinementExits | None" = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            query_states = self.q_proj(hidden_states)
        else:
            query_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query_states = query_states.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(query_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        kv_latent, k_rot = torch.split(
            self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        # Single-head 4D views so that every cache layer type stores the latents like ordinary keys / values.
        kv_latent = self.kv_a_layernorm(kv_latent).view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_rot = k_rot.view(batch_size, 1, seq_length, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
        if exits is not None:
            kv_latent, k_rot = exits.cache_update(self.layer_idx, kv_latent, k_rot)
        if past_key_values is not None:
            kv_latent, k_rot = past_key_values.update(kv_latent, k_rot, cache_index)

        key_value = self.kv_b_proj(kv_latent).view(
            batch_size, kv_latent.shape[2], -1, self.qk_nope_head_dim + self.v_head_dim
        )
        k_pass, value_states = torch.split(key_value.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_states = torch.cat((k_pass, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        query_states = torch.cat((q_pass, q_rot), dim=-1)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        if self.config.attention_output_gate != "none":
            attn_output = self.output_gate(attn_output, hidden_states)
        return self.o_proj(attn_output), attn_weights


# --------------------------------------------------------------------------------------------------------------------
# Feed-forward: dense SwiGLU, fused experts, router, MoE block


class ApexMLP(nn.Module):
    def __init__(self, config: ApexConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# Apex's own experts implementation, "apex_grouped_mm" (the default on a GPU). transformers' grouped_mm forward, on an
# H200 at apex_hf's benchmark shape,
#  * backpropagates its token gather and its un-permutation as scatter-adds (`index_put` with accumulation), and
#    (5.17) masks every row for expert-parallel sentinels even without expert parallelism: 17.9 ms forward + backward
#    per layer eager and 10.2 compiled, against 12.3 and 9.5 here (16,384 tokens, 64 experts, top-8);
#  * is swapped by `generate` for batched_mm, which copies the chosen expert's weights for every (token, expert)
#    pair: 1.45 ms per layer at batch 32, where reading every expert once takes 0.18 ms.
# So Apex keeps torch's grouped GEMM for many tokens with its own gathers around it, and picks the cheapest path for
# few tokens itself. CUDA-graph timings per layer in ms, eager | compiled, at 1 / 4 / 8 / 32 / 128 tokens:
#   batched_mm (per-pair weight copies)   0.08 0.25 0.44 1.44 5.45 | 0.07 0.24 0.45 1.71 6.66
#   grouped GEMM                          0.09 0.16 0.22 0.30 0.30 | 0.06 0.12 0.19 0.25 0.28
#   every expert on every token           0.16 0.16 0.17 0.18 0.24 | 0.16 0.16 0.16 0.17 0.20
#   gathered reduction                                             | 0.04 0.11 0.21 0.78 3.06
# Every expert wins once the (token, expert) pairs cover the experts, while the call stays memory-bound: up to
# `EVERY_EXPERT_MAX_TOKENS` tokens its arithmetic intensity is below Hopper's ~200 FLOP per byte. With fewer pairs,
# compiled code (static-cache decoding) gathers the chosen rows, and eager code groups.
EVERY_EXPERT_MAX_TOKENS = 128


class _DispatchToExperts(torch.autograd.Function):
    """`hidden_states[rows_by_expert // top_k]`: each token once per chosen expert, rows sorted by expert. The backward
    gathers the rows back into (token, choice) order and sums the k copies of each token: no scatter-add."""

    @staticmethod
    def forward(ctx, hidden_states, rows_by_expert, row_positions, top_k):
        ctx.save_for_backward(row_positions)
        ctx.top_k = top_k
        return hidden_states[rows_by_expert // top_k]

    @staticmethod
    def backward(ctx, grad_rows):
        (row_positions,) = ctx.saved_tensors
        grad = grad_rows[row_positions].view(-1, ctx.top_k, grad_rows.shape[-1]).sum(dim=1)
        return grad, None, None, None


class _CombineFromExperts(torch.autograd.Function):
    """Rows sorted by expert back into (token, choice) order: a gather whose backward is the opposite gather."""

    @staticmethod
    def forward(ctx, rows, rows_by_expert, row_positions):
        ctx.save_for_backward(rows_by_expert)
        return rows[row_positions]

    @staticmethod
    def backward(ctx, grad_out):
        (rows_by_expert,) = ctx.saved_tensors
        return grad_out[rows_by_expert], None, None


def _every_expert_forward(self, hidden_states, top_k_index, top_k_weights):
    """Each expert on every token as two batched GEMMs, mixed by the routing weights (zero for unchosen experts)."""
    gate_up = torch.matmul(hidden_states, self.gate_up_proj.transpose(1, 2))  # (experts, tokens, 2 * intermediate)
    if self.has_bias:
        gate_up = gate_up + self.gate_up_proj_bias.unsqueeze(1)
    out = torch.bmm(self._apply_gate(gate_up), self.down_proj.transpose(1, 2))  # (experts, tokens, hidden)
    if self.has_bias:
        out = out + self.down_proj_bias.unsqueeze(1)
    mixing = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=out.dtype, device=out.device)
    mixing = mixing.scatter(1, top_k_index, top_k_weights.to(out.dtype))
    return torch.einsum("te,eth->th", mixing, out)


def _gathered_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Each (token, expert) pair multiplied into its expert's weight rows and summed over the input features.
    Compiled, each projection becomes one reduction kernel that reads the chosen experts' rows where they lie, where
    batched_mm copies them first; eagerly it would materialize every product, so only compiled code takes it."""
    gate_up = (self.gate_up_proj[top_k_index] * hidden_states[:, None, None, :]).sum(-1)  # (tokens, k, 2 * inter.)
    if self.has_bias:
        gate_up = gate_up + self.gate_up_proj_bias[top_k_index]
    out = (self.down_proj[top_k_index] * self._apply_gate(gate_up).unsqueeze(-2)).sum(-1)  # (tokens, k, hidden)
    if self.has_bias:
        out = out + self.down_proj_bias[top_k_index]
    return (out * top_k_weights.unsqueeze(-1).to(out.dtype)).sum(dim=1).to(hidden_states.dtype)


def _grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Tokens permuted into per-expert groups, two grouped GEMMs, weighted and permuted back."""
    num_tokens, top_k = top_k_index.shape
    expert_ids, rows_by_expert = torch.sort(top_k_index.reshape(-1))
    row_positions = torch.empty_like(rows_by_expert)
    row_positions[rows_by_expert] = torch.arange(rows_by_expert.numel(), device=rows_by_expert.device)
    # histc rather than bincount: no device sync, so CUDA graphs can capture it. It counts ints on CUDA, floats on CPU.
    counts = torch.histc(
        expert_ids.int() if expert_ids.is_cuda else expert_ids.float(), self.num_experts, 0, self.num_experts - 1
    )
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # `_grouped_linear` is transformers' dispatch to torch's grouped GEMM, with its fallback where that has no kernel
    # (fp32 under torch.compile, older CPU builds).
    biases = {
        name: getattr(self, f"{name}_proj_bias")[expert_ids] if self.has_bias else None for name in ("gate_up", "down")
    }
    rows = _DispatchToExperts.apply(hidden_states, rows_by_expert, row_positions, top_k)
    gate_up = _grouped_linear(rows, self.gate_up_proj, offsets, bias=biases["gate_up"])
    out = _grouped_linear(self._apply_gate(gate_up), self.down_proj, offsets, bias=biases["down"])
    out = out * top_k_weights.reshape(-1)[rows_by_expert].unsqueeze(-1).to(out.dtype)
    out = _CombineFromExperts.apply(out, rows_by_expert, row_positions)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def apex_grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The cheapest of the gathered reduction, every expert and grouped GEMMs for this many tokens (see above)."""
    # Expert parallelism routes foreign tokens to sentinel ids, which transformers' forward masks. transformers >= 5.23
    # flags it; 5.17 - 5.22 only shrink `num_experts` to this rank's experts.
    if getattr(self, "_is_expert_parallel", self.num_experts < self.config.num_experts):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, top_k = top_k_index.shape
    pairs_cover_experts = num_tokens * top_k >= self.num_experts
    if not pairs_cover_experts and is_compiling():
        return _gathered_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if pairs_cover_experts and num_tokens <= EVERY_EXPERT_MAX_TOKENS:
        return _every_expert_forward(self, hidden_states, top_k_index, top_k_weights)
    return _grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)


# Registered with transformers, which accepts an `experts_implementation` only if its interface knows the name.
ExpertsInterface.register("apex_grouped_mm", apex_grouped_mm_experts_forward)


@use_experts_implementation
class ApexExperts(nn.Module):
    """Routed experts as fused 3D parameters, so transformers' eager / batched_mm / grouped_mm kernels, Apex's
    apex_grouped_mm and PEFT's `target_parameters` apply. The forward below is the eager reference; the kernels call
    `_apply_gate` too."""

    def __init__(self, config: ApexConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.swiglu_limit, self.swiglu_alpha = config.swiglu_limit, config.swiglu_alpha

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        if self.swiglu_limit is None:
            return self.act_fn(gate) * up
        gate = gate.clamp(max=self.swiglu_limit)  # GPT-OSS: bounded activations, and the up path gets a +1 skip
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate_up = F.linear(
                hidden_states[token_idx], self.gate_up_proj[expert_idx], self._bias("gate_up", expert_idx)
            )
            expert_out = F.linear(
                self._apply_gate(gate_up), self.down_proj[expert_idx], self._bias("down", expert_idx)
            )
            expert_out = expert_out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, expert_out.to(final_hidden_states.dtype))
        return final_hidden_states

    def _bias(self, projection: str, expert_idx: torch.Tensor) -> torch.Tensor | None:
        return getattr(self, f"{projection}_proj_bias")[expert_idx] if self.has_bias else None


@use_experts_implementation(has_bias=True)
class ApexBiasedExperts(ApexExperts):
    """Experts with a bias on each projection (`config.expert_bias`, GPT-OSS). A class of its own because
    transformers' experts kernels read `has_bias` from the decorator, once per class."""

    def __init__(self, config: ApexConfig):
        super().__init__(config)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, 2 * self.intermediate_dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))


class ApexTopKRouter(nn.Module):
    """Softmax or sigmoid scoring, optional group-limited selection, top-k, renormalisation and routed scaling.

    `e_score_correction_bias` shifts the scores used to *choose* experts, never the mixing weights (DeepSeek-V3
    aux-loss-free balancing). Logits are computed in fp32: routing decisions flip on bf16 rounding otherwise.
    Returns `(router_logits, top_k_weights, top_k_index)`, the transformers MoE convention."""

    def __init__(self, config: ApexConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        if config.router_bias:
            self.bias = nn.Parameter(torch.zeros(self.num_experts))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts))
        # Assignments per expert since the last bias update (aux-loss-free balancing). Saved with the weights so that
        # a run resumed from a checkpoint takes the same next balancing step as one that never stopped.
        self.expert_load = nn.Buffer(torch.zeros(self.num_experts))
        self.last_z_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        bias = self.bias.float() if self.config.router_bias else None
        router_logits = F.linear(hidden_states.float(), self.weight.float(), bias)
        if self.config.router_scoring == "softmax":
            scores = router_logits.softmax(dim=-1)
        else:
            scores = router_logits.sigmoid()
        scores_for_choice = self._restrict_to_top_groups(scores + self.e_score_correction_bias)
        top_k_index = torch.topk(scores_for_choice, self.top_k, dim=-1)[1]
        top_k_weights = scores.gather(1, top_k_index)
        if self.config.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        top_k_weights = top_k_weights * self.config.routed_scaling_factor

        if is_training_forward(self):
            top_k_weights = self._training_extras(router_logits, top_k_index, top_k_weights)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def _restrict_to_top_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: only experts in the `topk_group` best of `n_group` groups stay eligible. A group is
        scored by its best expert (softmax, DeepSeek-V2) or its two best summed (sigmoid, DeepSeek-V3)."""
        n_group = self.config.n_group
        if n_group == 1:
            return scores
        grouped = scores.view(-1, n_group, self.num_experts // n_group)
        top_in_group = 2 if self.config.router_scoring == "sigmoid" else 1
        group_scores = grouped.topk(min(top_in_group, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.config.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)

    def _training_extras(self, router_logits, top_k_index, top_k_weights):
        config = self.config
        if config.expert_capacity_factor is not None:
            capacity = config.expert_capacity(router_logits.shape[0])
            assignments = F.one_hot(top_k_index, self.num_experts)
            # Position of each assignment in its expert's queue, tokens in order (this is what breaks causality).
            queue_position = (assignments.flatten(0, 1).cumsum(0).view_as(assignments) * assignments).sum(-1) - 1
            top_k_weights = top_k_weights * (queue_position < capacity)
        if config.router_bias_update_rate > 0:
            with torch.no_grad():
                self.expert_load.scatter_add_(
                    0, top_k_index.flatten(), torch.ones_like(top_k_index.flatten(), dtype=self.expert_load.dtype)
                )
        if config.router_z_loss_coef > 0:
            z_loss = torch.logsumexp(router_logits, dim=-1).pow(2).mean()
            self.last_z_loss = z_loss.detach()
            top_k_weights = attach_aux_loss(top_k_weights, config.router_z_loss_coef * z_loss)
        return top_k_weights

    @torch.no_grad()
    def update_bias_from_load(self) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        load = self.expert_load
        self.e_score_correction_bias.add_(self.config.router_bias_update_rate * torch.sign(load.mean() - load))
        load.zero_()


class ApexSparseMoeBlock(nn.Module):
    def __init__(self, config: ApexConfig):
        super().__init__()
        self.experts = ApexBiasedExperts(config) if config.expert_bias else ApexExperts(config)
        self.gate = ApexTopKRouter(config)
        if config.num_shared_experts > 0:
            self.shared_experts = ApexMLP(config, config.moe_intermediate_size * config.num_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(flat)
        output = self._run_experts(flat, selected_experts, routing_weights).view(
            batch_size, sequence_length, hidden_dim
        )
        if hasattr(self, "shared_experts"):
            output = output + self.shared_experts(hidden_states)
        return output

    def _run_experts(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The experts, under autocast in its dtype. transformers' grouped_mm / batched_mm kernels are no autocast
        ops: with fp32 master weights they would run fp32 GEMMs (3x slower training on an H200). So, as autocast does
        for `F.linear`, they get a copy of the weights in the autocast dtype, through which gradients reach the
        weights. A PEFT-wrapped experts module is left as it is."""
        experts, device_type = self.experts, hidden_states.device.type
        if not (torch.is_autocast_enabled(device_type) and isinstance(experts, ApexExperts)):
            return experts(hidden_states, top_k_index, top_k_weights)
        dtype = torch.get_autocast_dtype(device_type)
        weights = dict(experts.named_parameters(recurse=False))
        if all(weight.dtype == dtype for weight in weights.values()):  # e.g. FSDP2 mixed precision already cast them
            return experts(hidden_states, top_k_index, top_k_weights)
        cast = {name: weight.to(dtype) for name, weight in weights.items()}
        return torch.func.functional_call(experts, cast, (hidden_states, top_k_index, top_k_weights))


# --------------------------------------------------------------------------------------------------------------------
# Decoder layer


class ApexDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + feed-forward, with `sandwich_norms` also post-norm on each branch's output. `layer_idx`
    is the *physical* index; the unrolled `cache_index` comes with each call because a core layer runs once per
    refinement pass."""

    def __init__(self, config: ApexConfig, layer_idx: int):
        super().__init__()
        attention_class = ApexMLAttention if config.attention_type == "mla" else ApexAttention
        self.self_attn = attention_class(config, layer_idx)
        if config.physical("mlp_layer_types")[layer_idx] == "sparse":
            self.mlp = ApexSparseMoeBlock(config)
        else:
            self.mlp = ApexMLP(config)
        self.input_layernorm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.sandwich_norms:
            self.post_self_attn_layernorm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_mlp_layernorm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.sandwich_norms = config.sandwich_norms

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        cache_index: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=resolve_cache_argument(cache, past_key_values),
            cache_index=cache_index,
            **kwargs,
        )
        if self.sandwich_norms:
            hidden_states = self.post_self_attn_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.sandwich_norms:
            hidden_states = self.post_mlp_layernorm(hidden_states)
        return residual + hidden_states


# --------------------------------------------------------------------------------------------------------------------
# Refinement: proposal / review / refinement heads, verifier, spiral memory


class ApexRefinement(nn.Module):
    """What runs between two passes of the shared core, per token (so it cannot leak future positions).

    After pass k the normed state x_k is projected into a proposal P_k, a review C_k and a refinement R_k. The
    verifier reads R_k and outputs s_k in [0, 1], its estimate of how close this pass's next-token distribution already
    is to the final one (`exp(-KL)`, see `ApexModel._closeness_to_final`).
    The spiral memory M_k is a gated update of M_{k-1} towards `tanh(W [P_k, C_k, R_k, embed(s_k), anchor])`, where
    the anchor is the prelude output (the invariant the loop must not drift from). M_k is injected into the next pass
    and the coda: `gated_add` adds it through a per-channel gate; `cross_attention` lets the token attend over its own
    history M_1..M_k (same position, earlier passes only: causal, and nothing to cache across positions).

    With `memory_injection="none"` and `refinement_verifier=True` only the verifier is built (R_k and s_k): the
    scores still train and drive early exit, and nothing enters the residual stream.
    """

    def __init__(self, config: ApexConfig):
        super().__init__()
        hidden, width = config.hidden_size, config.refinement_dim
        self.injection = config.memory_injection
        self.input_norm = ApexRMSNorm(hidden, eps=config.rms_norm_eps)
        self.refinement_proj = nn.Linear(hidden, width, bias=False)
        self.verifier = nn.Linear(width, 1)
        if not self.has_memory:
            return
        self.proposal_proj = nn.Linear(hidden, width, bias=False)
        self.review_proj = nn.Linear(hidden, width, bias=False)
        self.anchor_proj = nn.Linear(hidden, width, bias=False)
        self.score_embed = nn.Linear(1, width)
        self.memory_update = nn.Linear(5 * width, 2 * hidden)  # candidate and update gate
        if self.injection == "cross_attention":
            self.memory_query = nn.Linear(hidden, width, bias=False)
            self.memory_key = nn.Linear(hidden, width, bias=False)
            self.memory_value = nn.Linear(hidden, hidden, bias=False)
        # Per-channel strength of the memory in the residual stream; zero makes the loop a plain recurrence.
        self.memory_gate = nn.Parameter(torch.zeros(hidden))

    @property
    def has_memory(self) -> bool:
        return self.injection != "none"

    def encode_anchor(self, anchor: torch.Tensor) -> torch.Tensor | None:
        return self.anchor_proj(self.input_norm(anchor)) if self.has_memory else None

    def forward(
        self, hidden_states: torch.Tensor, anchor_features: torch.Tensor | None, memory: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One refinement step: the verifier score `[batch, seq]` and the updated memory `[batch, seq, hidden]`
        (None without memory)."""
        x = self.input_norm(hidden_states)
        refinement = self.refinement_proj(x)
        # The sigmoid in float32: exit thresholds sit near 1 (0.999 is a KL of 0.001), where bf16 steps by 0.004.
        score = torch.sigmoid(self.verifier(F.silu(refinement)).float())
        if not self.has_memory:
            return score.squeeze(-1), None
        features = torch.cat(
            (
                self.proposal_proj(x),
                self.review_proj(x),
                refinement,
                self.score_embed(score.to(x.dtype)),
                anchor_features,
            ),
            dim=-1,
        )
        candidate, update_gate = self.memory_update(features).chunk(2, dim=-1)
        candidate, update_gate = torch.tanh(candidate), torch.sigmoid(update_gate)
        memory = update_gate * candidate if memory is None else memory + update_gate * (candidate - memory)
        return score.squeeze(-1), memory

    def inject(self, hidden_states: torch.Tensor, memories: list[torch.Tensor]) -> torch.Tensor:
        if self.injection == "gated_add":
            return hidden_states + self.memory_gate * memories[-1]
        history = torch.stack(memories, dim=-2)  # [batch, seq, passes, hidden]
        query = self.memory_query(self.input_norm(hidden_states)).unsqueeze(-2)
        weights = (query * self.memory_key(history)).sum(-1) / math.sqrt(query.shape[-1])
        read = (weights.softmax(dim=-1).unsqueeze(-1) * self.memory_value(history)).sum(-2)
        return hidden_states + self.memory_gate * read


def score_and_remember(
    refinement: ApexRefinement, hidden_states, anchor_features, memories: list, exits
) -> torch.Tensor:
    """The verifier's score of a pass; appends the pass's memory to `memories` (held for tokens that have exited)."""
    score, memory = refinement(hidden_states, anchor_features, memories[-1] if memories else None)
    if memory is not None:
        if exits is not None and memories:
            memory = exits.keep_exited(memory, memories[-1])
        memories.append(memory)
    return score


class ApexInputInjection(nn.Module):
    """Re-injects the prelude output e into every pass after the first (Huginn's input injection): `"add"` gives
    h + e, `"scaled_add"` gives (h + e) / sqrt(2), `"adapter"` gives `W [h; e]` with W initialised to [I, I], i.e.
    h + e, free to learn a mix. Without it a pass sees its input only through the previous pass, and the loop can
    drift from the sequence it reads. With `"add"` every pass adds e once more, so the state grows with the number
    of passes; the 1 / sqrt(2) keeps its scale (h and e are roughly uncorrelated) and lets earlier passes fade
    geometrically, so the state after more passes than trained looks like the trained one."""

    def __init__(self, config: ApexConfig):
        super().__init__()
        self.mode = config.refinement_input_injection
        if self.mode == "adapter":  # a bare parameter, not nn.Linear: its [I, I] start is its only initialisation
            self.adapter_weight = nn.Parameter(torch.empty(config.hidden_size, 2 * config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, prelude_output: torch.Tensor) -> torch.Tensor:
        if self.mode == "add":
            return hidden_states + prelude_output
        if self.mode == "scaled_add":
            return (hidden_states + prelude_output) * math.sqrt(0.5)
        return F.linear(torch.cat((hidden_states, prelude_output), dim=-1), self.adapter_weight)


class RefinementExits:
    """Per-token early exit from the refinement loop for one forward call (`refinement_exit_threshold`).

    After each pass but the last, a token whose verifier score reaches the threshold leaves the loop: its hidden state
    and memory stay as they are. The passes it skips still give later tokens something to attend to: each core layer
    writes, for that token, the keys and values of the token's latest computed pass (Huginn's rule), both into the
    cache and into this call's attention. So a cached `generate` computes what recomputing the whole sequence with the
    same exits computes. When every token of the call has left, the remaining passes are not run at all; their cache
    slots get those latest keys and values. That is where decoding saves time: fewer core-layer calls, not masked-out
    work. The check costs one device sync per pass, so exits are for eager inference, not compiled graphs.
    """

    def __init__(self, threshold: float, batch_and_seq: torch.Size, num_passes: int, device: torch.device):
        self.threshold = threshold
        self.exited = torch.zeros(batch_and_seq, dtype=torch.bool, device=device)
        self.steps_used = torch.full(batch_and_seq, num_passes, dtype=torch.long, device=device)
        self.latest_cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # physical layer -> its cache update

    def cache_update(self, layer_idx: int, first: torch.Tensor, second: torch.Tensor):
        """The two tensors a core layer caches (keys and values, or MLA's latent and rotary key, `[b, h, seq, d]`),
        with the latest computed pass's in place of this pass's for tokens that have left the loop."""
        if layer_idx in self.latest_cached:
            keep = self.exited[:, None, :, None]
            latest_first, latest_second = self.latest_cached[layer_idx]
            first, second = torch.where(keep, latest_first, first), torch.where(keep, latest_second, second)
        self.latest_cached[layer_idx] = (first, second)
        return first, second

    def keep_exited(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` for tokens still in the loop, `old` for those that left before this pass."""
        return torch.where(self.exited[..., None], old, new)

    def after_pass(self, step: int, scores: torch.Tensor) -> None:
        leaving = (scores >= self.threshold) & ~self.exited
        self.steps_used = torch.where(leaving, step + 1, self.steps_used)
        self.exited |= leaving

    def everyone_exited(self) -> bool:
        return bool(self.exited.all())  # one device sync


# --------------------------------------------------------------------------------------------------------------------
# Pre-trained model base


@dataclass
class ApexModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus, per refinement pass, the verifier scores `[batch, seq]` and the spiral memory
    `[batch, seq, hidden]` (empty when `memory_injection="none"`)."""

    verifier_scores: tuple[torch.Tensor, ...] | None = None
    memory_states: tuple[torch.Tensor, ...] | None = None
    refinement_steps_used: torch.LongTensor | None = None  # [batch, seq]: passes each token ran (early exit)
    # Training forwards with the exit loss: every pass but the last read out through the coda and final norm.
    exit_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ApexCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    verifier_scores: tuple[torch.Tensor, ...] | None = None
    memory_states: tuple[torch.Tensor, ...] | None = None
    refinement_steps_used: torch.LongTensor | None = None
    mtp_loss: torch.Tensor | None = None


class ApexPreTrainedModel(PreTrainedModel):
    config: ApexConfig
    config_class = ApexConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ApexDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the cache under its names from 5.25 and before
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # eager experts and the training-time router statistics are data dependent
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(ApexTopKRouter, index=0),
        "hidden_states": ApexDecoderLayer,
        "attentions": [OutputRecorder(ApexAttention, index=1), OutputRecorder(ApexMLAttention, index=1)],
    }

    @property
    def _supports_sdpa(self) -> bool:
        # SDPA takes no sink logits and would silently ignore them; eager, flex and flash attention take them.
        return not self.config.attention_sinks

    @torch.no_grad()
    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # The default is Apex's own "apex_grouped_mm" on a GPU. torch's grouped_mm has no fast CPU kernel (apex-small
        # sampling: 4.1 s with it, 0.54 s eager), so without a GPU it is the eager loop. An explicit
        # `experts_implementation` is always respected.
        if requested_experts is None:
            requested_experts = "apex_grouped_mm" if torch.cuda.is_available() else "eager"
        return super().get_correct_experts_implementation(requested_experts)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ApexExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.has_bias:
                init.zeros_(module.gate_up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, ApexTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.config.router_bias:
                init.zeros_(module.bias)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, ApexAttention) and hasattr(module, "sinks"):
            init.zeros_(module.sinks)
        elif isinstance(module, ApexRefinement):
            # Small but non-zero so the memory gets gradient from the first step; upcycling sets it to zero.
            init.constant_(module.memory_gate, std)
        elif isinstance(module, ApexRotaryEmbedding) and module.config.rope_per_layer_type:
            # transformers re-creates the shared set of frequencies itself (`original_inv_freq`); not per-type sets.
            for layer_type in module.rope_type:
                inv_freq, _ = module.frequencies(layer_type)
                init.copy_(getattr(module, f"{layer_type}_inv_freq"), inv_freq)
                init.copy_(getattr(module, f"{layer_type}_original_inv_freq"), inv_freq)
        elif isinstance(module, ApexModel) and hasattr(module, "pass_gates"):
            init.ones_(module.pass_gates)  # every pass at full strength; upcycling sets the gates to zero
        elif isinstance(module, ApexInputInjection) and module.mode == "adapter":
            hidden = module.adapter_weight.shape[0]
            init.copy_(module.adapter_weight, torch.eye(hidden).repeat(1, 2))  # h + e


# --------------------------------------------------------------------------------------------------------------------
# The backbone: embeddings -> prelude -> core x K (+ refinement) -> coda -> final norm


class ApexModel(ApexPreTrainedModel):
    def __init__(self, config: ApexConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ApexDecoderLayer(config, i) for i in range(config.num_physical_layers)])
        if config.has_refinement_verifier:
            self.refinement = ApexRefinement(config)
        if config.refinement_pass_gate and config.max_refinement_steps > 1:
            self.pass_gates = nn.Parameter(torch.ones(config.max_refinement_steps - 1, config.hidden_size))
        if config.refinement_input_injection != "none" and config.max_refinement_steps > 1:
            self.input_injection = ApexInputInjection(config)
        if config.refinement_state_norm != "none":
            self.state_norm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._training_forwards = 0  # drives the draw of passes per training forward (`refinement_sampling`)
        self.norm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ApexRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # Detached values of the Apex auxiliary losses of the last forward, for logging (trainers never see them).
        self.aux_losses: dict[str, torch.Tensor] = {}
        self._output_head: list[nn.Module] = []  # see `use_output_head`
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_refinement_steps: int | None = None,
        refinement_exit_threshold: float | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ApexModelOutputWithPast:
        r"""
        cache / past_key_values (`Cache`, *optional*):
            The KV cache, under its transformers >= 5.25 name or its earlier one (one of the two).
        num_refinement_steps (`int`, *optional*):
            Passes of the shared core for this call, between 1 and `config.max_refinement_steps` (the passes the
            cache has slots for). Defaults to `config.num_refinement_steps`. Keep it fixed within one generation.
        refinement_exit_threshold (`float`, *optional*):
            Per-token early exit for this call (see `RefinementExits`); defaults to
            `config.refinement_exit_threshold`. A value above 1 turns it off. Keep it fixed within one generation.
        """
        config = self.config
        check_forward_kwargs(type(self).__name__, kwargs)
        past_key_values = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        num_passes = self._resolve_refinement_steps(num_refinement_steps)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_seen_tokens)
        self._check_cache_passes(past_key_values, past_seen_tokens, num_passes)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        self._check_length(past_seen_tokens + inputs_embeds.shape[1], past_key_values)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        if is_training_forward(self):
            self._update_router_biases()

        if not isinstance(causal_mask_mapping := attention_mask, dict):
            # Positional: the cache argument is `past_key_values` before transformers 5.25 and `cache` from then on.
            mask_args = (config, inputs_embeds, attention_mask, past_key_values, position_ids)
            causal_mask_mapping = {"full_attention": create_causal_mask(*mask_args)}
            if "sliding_attention" in config.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(*mask_args)

        position_embeddings = self.position_embeddings(inputs_embeds, position_ids)

        exits = self._resolve_exits(refinement_exit_threshold, inputs_embeds, num_passes)

        def run_layer(hidden_states: torch.Tensor, unrolled_index: int, cache: Cache | None = past_key_values):
            layer_type = config.layer_types[unrolled_index]
            in_core = config.num_prelude_layers <= unrolled_index < config.unrolled_coda_start
            return self.layers[config.physical_layer_index(unrolled_index)](
                hidden_states,
                attention_mask=causal_mask_mapping[layer_type],
                position_embeddings=position_embeddings[layer_type],
                cache_index=unrolled_index,
                **{CACHE_NAME: cache},
                position_ids=position_ids,  # flash attention reads packed documents from them (it takes no mask)
                **({"exits": exits} if exits is not None and in_core else {}),
                **kwargs,
            )

        def run_coda(hidden_states: torch.Tensor, cache: Cache | None) -> torch.Tensor:
            if config.refinement_state_norm == "before_coda":
                hidden_states = self.state_norm(hidden_states)
            for unrolled_index in range(config.unrolled_coda_start, config.num_hidden_layers):
                hidden_states = run_layer(hidden_states, unrolled_index, cache)
            return self.norm(hidden_states)

        hidden_states = inputs_embeds
        for unrolled_index in range(config.num_prelude_layers):
            hidden_states = run_layer(hidden_states, unrolled_index)
        hidden_states, pass_states, verifier_scores, memories = self._refine(
            hidden_states, num_passes, run_layer, exits, past_key_values
        )
        # Before the model's own coda run, so recorded hidden states still end with the model's last layers.
        exit_states = self._read_out_exits(pass_states, memories, run_coda)
        hidden_states = run_coda(hidden_states, past_key_values)
        hidden_states = self._attach_refinement_losses(
            hidden_states, pass_states, verifier_scores, attention_mask, exit_states
        )

        if exits is not None:
            steps_used = exits.steps_used
        else:
            steps_used = torch.full(inputs_embeds.shape[:2], num_passes, device=inputs_embeds.device)
        return ApexModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: past_key_values},
            verifier_scores=tuple(verifier_scores),
            memory_states=tuple(memories),
            refinement_steps_used=steps_used,
            exit_hidden_states=tuple(exit_states) or None,
        )

    def _refine(self, hidden_states, num_passes, run_layer, exits: RefinementExits | None, cache: Cache | None):
        """The shared core run `num_passes` times on the prelude output, with the loop recipe (input injection,
        truncated backpropagation), memory and verifier, and early exits. Returns the state for the coda (memory
        injected), and per pass the states, verifier scores and memories."""
        config = self.config
        refinement = getattr(self, "refinement", None)
        input_injection = getattr(self, "input_injection", None)
        prelude_output = hidden_states
        anchor_features = refinement.encode_anchor(hidden_states) if refinement is not None else None  # memory only
        pass_states, verifier_scores, memories = [], [], []
        grad_enabled, first_backprop_pass = torch.is_grad_enabled(), self._first_backprop_pass(num_passes)
        for step in range(num_passes):
            if exits is not None and step > 0 and exits.everyone_exited():
                self._fill_skipped_passes(exits, cache, first_skipped=step, num_passes=num_passes)
                break
            with torch.set_grad_enabled(grad_enabled and step >= first_backprop_pass):
                pass_input = hidden_states
                if step > 0 and memories:
                    hidden_states = refinement.inject(hidden_states, memories)
                if step > 0 and input_injection is not None:
                    hidden_states = input_injection(hidden_states, prelude_output)
                for core_index in range(config.num_core_layers):
                    hidden_states = run_layer(hidden_states, config.unrolled_core_index(step, core_index))
                if config.refinement_state_norm == "every_pass":
                    hidden_states = self.state_norm(hidden_states)
                if step > 0 and hasattr(self, "pass_gates"):
                    hidden_states = pass_input + self.pass_gates[step - 1] * (hidden_states - pass_input)
                if exits is not None:
                    hidden_states = exits.keep_exited(hidden_states, pass_input)
                pass_states.append(hidden_states)
                if refinement is not None:
                    verifier_scores.append(
                        score_and_remember(refinement, hidden_states, anchor_features, memories, exits)
                    )
                    if exits is not None and step < num_passes - 1:
                        exits.after_pass(step, verifier_scores[-1])
        if memories:
            hidden_states = refinement.inject(hidden_states, memories)
        return hidden_states, pass_states, verifier_scores, memories

    def _read_out_exits(self, pass_states: list, memories: list, run_coda) -> list[torch.Tensor]:
        """Training forwards with the exit loss (`refinement_exit_loss_coef`): every pass but the last read out through
        the coda and the final norm, as if every token left the loop after it (with the memory it had then). Run
        without the cache: a training forward's cache, if any, belongs to the model's own coda run."""
        if self.config.refinement_exit_loss_coef <= 0 or not is_training_forward(self):
            return []
        refinement = getattr(self, "refinement", None)
        exit_states = []
        for step, state in enumerate(pass_states[:-1]):
            if memories:
                state = refinement.inject(state, memories[: step + 1])
            exit_states.append(run_coda(state, None))
        return exit_states

    def _fill_skipped_passes(self, exits: RefinementExits, cache: Cache | None, first_skipped: int, num_passes: int):
        """Every token has left the loop: the cache slots of the passes not run get each core layer's latest keys and
        values, so that later tokens that do run those passes find an entry for these positions."""
        if cache is None:
            return
        config = self.config
        for step in range(first_skipped, num_passes):
            for core_index in range(config.num_core_layers):
                unrolled = config.unrolled_core_index(step, core_index)
                cache.update(*exits.latest_cached[config.physical_layer_index(unrolled)], unrolled)

    def _resolve_exits(self, threshold: float | None, inputs_embeds: torch.Tensor, num_passes: int):
        """The early-exit bookkeeping of this call, or None: no threshold, one pass, or a training forward (the
        loop trains at full depth)."""
        if threshold is None:
            threshold = self.config.refinement_exit_threshold
        if threshold is None or num_passes == 1 or is_training_forward(self):
            return None
        if not hasattr(self, "refinement"):
            raise ValueError(
                f"refinement_exit_threshold={threshold} needs the verifier, which this model does not have; build it "
                f"with refinement_verifier=True"
            )
        if threshold < 0:
            raise ValueError(f"refinement_exit_threshold={threshold} is invalid: must be >= 0 (above 1 turns it off)")
        return RefinementExits(threshold, inputs_embeds.shape[:2], num_passes, inputs_embeds.device)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            # The multiplier is rounded to the embedding dtype first, as Gemma 3 does, so bf16 outputs match it.
            inputs_embeds = inputs_embeds * inputs_embeds.new_tensor(self.config.embedding_multiplier)
        return inputs_embeds

    def position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor) -> dict:
        """RoPE (cos, sin) for each attention layer type."""
        if not self.config.rope_per_layer_type:
            shared = self.rotary_emb(hidden_states, position_ids)
            return {layer_type: shared for layer_type in set(self.config.layer_types)}
        return {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.config.layer_types)}

    def _resolve_refinement_steps(self, num_refinement_steps: int | None) -> int:
        if num_refinement_steps is None:
            if is_training_forward(self) and self.config.refinement_sampling != "fixed":
                return self._sample_training_passes()
            return self.config.num_refinement_steps
        if not 1 <= num_refinement_steps <= self.config.max_refinement_steps:
            raise ValueError(
                f"num_refinement_steps={num_refinement_steps} is out of range: this model's cache has slots for "
                f"1..{self.config.max_refinement_steps} passes (config.max_refinement_steps)"
            )
        return num_refinement_steps

    def _sample_training_passes(self) -> int:
        """Passes for this training forward (`refinement_sampling`). The generator is seeded with the count of training
        forwards, not the global RNG, so every data-parallel rank draws the same K and runs the same collectives."""
        config = self.config
        self._training_forwards += 1
        generator = torch.Generator().manual_seed(self._training_forwards)
        low, high = config.refinement_sampling_min, config.sampled_passes_max
        if config.refinement_sampling == "uniform":
            return int(torch.randint(low, high + 1, (), generator=generator))
        mean_extra = torch.tensor(float(config.num_refinement_steps - 1))
        return min(max(1 + int(torch.poisson(mean_extra, generator=generator)), low), high)

    def _first_backprop_pass(self, num_passes: int) -> int:
        """Truncated backpropagation through the loop (`refinement_backprop_steps`): passes before this one run
        without gradients."""
        keep = self.config.refinement_backprop_steps
        if keep is None or not is_training_forward(self):
            return 0
        return max(num_passes - keep, 0)

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks: misuse that would run and silently change the output (a mask of another length, positions past the
    # trained length, a cache continued with another number of passes) or fail deep inside a layer is refused before
    # any compute. Shapes cost nothing; the value ranges are read with one device sync. All of it is skipped while
    # compiling, where a data-dependent branch would break the graph (eager runs and the first call check).

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_seen_tokens) -> None:
        if is_compiling():
            return
        if input_ids is not None:
            check_token_tensor("input_ids", input_ids)
            batch, length = input_ids.shape
        else:
            hidden_size = self.config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, sequence, hidden_size={hidden_size}), got "
                    f"{tuple(inputs_embeds.shape)}"
                )
            if not inputs_embeds.dtype.is_floating_point:
                raise TypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
            batch, length = inputs_embeds.shape[:2]
        check_attention_mask(attention_mask, batch, length, past_seen_tokens)
        if position_ids is not None:
            check_token_tensor("position_ids", position_ids)
            if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"position_ids has shape {tuple(position_ids.shape)}; it must be ({batch} or 1, {length}), one "
                    f"position per input token"
                )
        self._check_value_ranges(input_ids, position_ids)

    def _check_value_ranges(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
        """Token ids inside the vocabulary, positions inside the trained length: both read in one device sync."""
        checked = {name: t for name, t in (("input_ids", input_ids), ("position_ids", position_ids)) if t is not None}
        checked = {name: t for name, t in checked.items() if t.numel() > 0}
        if not checked:
            return
        bounds = torch.stack([torch.stack((t.min(), t.max())).long() for t in checked.values()]).tolist()
        ranges = dict(zip(checked, bounds))
        vocab_size, limit = self.config.vocab_size, self.config.max_trained_length
        low, high = ranges.get("input_ids", (0, 0))
        if low < 0 or high >= vocab_size:
            raise IndexError(
                f"input_ids contains token id {high if high >= vocab_size else low}, outside the vocabulary [0, "
                f"{vocab_size}); check that the tokenizer matches the model (resize the embeddings if the tokenizer "
                f"grew)"
            )
        low, high = ranges.get("position_ids", (0, 0))
        if low < 0:
            raise ValueError(f"position_ids contains position {low}; positions are >= 0")
        if limit is not None and high >= limit:
            warn_past_trained_length(f"Position {high} in position_ids", limit, self.config.rope_types)

    def _check_cache_passes(self, cache: Cache | None, past_seen_tokens, num_passes: int) -> None:
        """A cache holds one slot per pass that filled it: continued with more passes, the extra passes would attend to
        empty slots; with fewer, the coda reads another pass's keys. The count is kept on the cache object when it is
        first filled. A static cache counts its tokens on the device (reading the count would sync): not checked."""
        if cache is None or isinstance(past_seen_tokens, torch.Tensor) or is_compiling():
            return
        filled_with = getattr(cache, "apex_refinement_passes", None)
        if past_seen_tokens > 0 and filled_with is not None and filled_with != num_passes:
            raise ValueError(
                f"the cache was filled with num_refinement_steps={filled_with} and is continued with "
                f"num_refinement_steps={num_passes}; keep the number of passes fixed within one generation"
            )
        if past_seen_tokens == 0:
            cache.apex_refinement_passes = num_passes

    def _check_length(self, total_length: int | torch.Tensor, past_key_values: Cache | None) -> None:
        """Past `max_position_embeddings`, with a RoPE that does not extrapolate, the model runs on positions it never
        trained on: a warning, as transformers' models give, not an error (a longer prompt is the caller's choice)."""
        limit = self.config.max_trained_length
        if limit is None:
            return
        if isinstance(total_length, torch.Tensor):
            # A static cache counts its tokens on the device: reading the count would sync, and break the compiled
            # decode graph, at every step. Its capacity bounds every length it will hold (`generate` sizes it to the
            # positions it will feed), so that is checked instead.
            total_length = past_key_values.get_max_length()
            what = f"A static cache of {total_length} tokens"
        else:
            what = f"Sequence length {total_length} (cached + new tokens)"
        if total_length > limit:
            warn_past_trained_length(what, limit, self.config.rope_types)

    def _update_router_biases(self) -> None:
        """Apply the aux-loss-free bias update for the load seen since the previous training forward. Doing it here,
        before any layer runs, keeps routing identical between a layer's forward and its activation-checkpointing
        recompute."""
        if self.config.router_bias_update_rate <= 0:
            return
        for module in self.modules():
            if isinstance(module, ApexTopKRouter):
                module.update_bias_from_load()  # zero load since the last update moves nothing: sign(0) = 0

    def _attach_refinement_losses(self, hidden_states, pass_states, verifier_scores, attention_mask, exit_states):
        """In training, the verifier and consistency losses are attached to the final hidden state so that they train
        under any loss computed from it (see `AuxLossAutoScaler`). Detached values go to `self.aux_losses`."""
        config = self.config
        self.aux_losses = {
            f"verifier_score_pass{k + 1}": s.detach().float().mean() for k, s in enumerate(verifier_scores)
        }
        if not self.training:
            return hidden_states
        token_weights = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_weights = attention_mask[:, -hidden_states.shape[1] :].to(torch.float32)

        def token_mean(values: torch.Tensor) -> torch.Tensor:
            if token_weights is None:
                return values.mean()
            return (values * token_weights).sum() / token_weights.sum().clamp(min=1)

        total = hidden_states.new_zeros((), dtype=torch.float32)
        if verifier_scores:
            # What each pass would predict: its exit read out through the coda when the exit loss trains (the last
            # pass's exit is the model's output, its target 1 by definition), else its logit lens.
            if exit_states:
                targets = self._closeness_to_final(exit_states, hidden_states)
                targets.append(torch.ones(hidden_states.shape[:-1], device=hidden_states.device))
            else:
                targets = self._closeness_to_final([self.norm(state) for state in pass_states], hidden_states)
            # The scores are already sigmoids; autocast refuses binary_cross_entropy, so it runs in fp32 outside it.
            with torch.autocast(hidden_states.device.type, enabled=False):
                verifier_loss = torch.stack(
                    [
                        token_mean(F.binary_cross_entropy(score.float(), target, reduction="none"))
                        for score, target in zip(verifier_scores, targets)
                    ]
                ).mean()
            self.aux_losses["verifier_loss"] = verifier_loss.detach()
            self.aux_losses["verifier_error"] = torch.stack(
                [
                    token_mean((score.detach().float() - target).abs())
                    for score, target in zip(verifier_scores, targets)
                ]
            ).mean()
            total = total + config.verifier_loss_coef * verifier_loss
        if len(pass_states) > 1:
            gaps = [
                token_mean(1 - F.cosine_similarity(a.float(), b.float(), dim=-1))
                for a, b in zip(pass_states[:-1], pass_states[1:])
            ]
            consistency_loss = torch.stack(gaps).mean()
            self.aux_losses["consistency_loss"] = consistency_loss.detach()
            total = total + config.consistency_loss_coef * consistency_loss
        z_losses = [
            m.last_z_loss for m in self.modules() if isinstance(m, ApexTopKRouter) and m.last_z_loss is not None
        ]
        if z_losses:
            self.aux_losses["router_z_loss"] = torch.stack(z_losses).mean()
        return attach_aux_loss(hidden_states, total)

    def use_output_head(self, head: nn.Module) -> None:
        """Tell the backbone which LM head the verifier's targets are read through. Kept in a list so the head stays
        the causal-LM's child (one copy in the state dict); a bare `ApexModel` reads through the input embeddings."""
        self._output_head = [head]

    @torch.no_grad()
    def _closeness_to_final(self, readouts, final_hidden, chunk_size: int = 1024) -> list[torch.Tensor]:
        """Verifier targets, no labels needed: `exp(-KL(final || pass))` per token, between the model's final
        next-token distribution and the one a pass's readout gives (the LM head on it). When the final distribution is
        calibrated, the KL is the expected loss increase from stopping after that pass, so a threshold t on the score
        bounds it near -log t (a halting target in the spirit of PonderNet and CALM). An earlier target, "the pass's
        top token equals the final one", let tokens leave whose probabilities were still far off. Chunked, so no
        full logits are kept; float32 for the softmaxes."""
        head = self._output_head[0] if self._output_head else None

        def log_probs(hidden: torch.Tensor) -> torch.Tensor:
            logits = head(hidden) if head is not None else F.linear(hidden, self.embed_tokens.weight)
            return F.log_softmax(logits.float(), dim=-1)

        chunked_readouts = [readout.reshape(-1, readout.shape[-1]).split(chunk_size) for readout in readouts]
        kl = [[] for _ in readouts]
        for index, final_chunk in enumerate(final_hidden.reshape(-1, final_hidden.shape[-1]).split(chunk_size)):
            final_log_probs = log_probs(final_chunk)
            for readout_kl, chunks in zip(kl, chunked_readouts):
                pointwise = F.kl_div(log_probs(chunks[index]), final_log_probs, log_target=True, reduction="none")
                readout_kl.append(pointwise.sum(-1))
        return [torch.exp(-torch.cat(k).clamp(min=0)).view(r.shape[:-1]) for k, r in zip(kl, readouts)]


def warn_past_trained_length(what: str, limit: int, rope_types: list[str]) -> None:
    logger.warning_once(
        f"{what} exceeds max_position_embeddings={limit}, and RoPE type {'/'.join(rope_types)} does not extrapolate: "
        f"outputs there are unreliable. Use a shorter input or a RoPE scaling (e.g. rope_type='dynamic', or 'yarn' "
        f"with a larger max_position_embeddings)"
    )


def check_token_tensor(name: str, tensor: torch.Tensor) -> None:
    """Token ids, positions and labels are integer tensors of shape (batch, sequence)."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, sequence), got shape {tuple(tensor.shape)}")


def check_attention_mask(attention_mask, batch: int, length: int, past_seen_tokens) -> None:
    """A 2-D padding mask covers the cached tokens and the new ones of every row: a shorter or longer one would be
    aligned with the wrong tokens, another batch size would drop or repeat rows. 4-D masks and mask mappings are
    built by the caller and passed through; a static cache's length is on the device, so only the batch is checked."""
    if not isinstance(attention_mask, torch.Tensor):
        return
    if attention_mask.dim() == 2:
        expected = past_seen_tokens + length if isinstance(past_seen_tokens, int) else attention_mask.shape[-1]
        if attention_mask.shape != (batch, expected) or attention_mask.shape[-1] < length:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch={batch}, cached + new "
                f"tokens={expected}) for this call"
            )
    elif attention_mask.dim() == 4 and attention_mask.shape[0] not in (1, batch):
        raise ValueError(f"a 4-D attention_mask covers batch {attention_mask.shape[0]}, the input {batch}")


def check_labels(labels: torch.Tensor, input_ids: torch.Tensor | None, inputs_embeds, vocab_size: int) -> None:
    """Labels: one per input token, each -100 (ignored) or a token id of the vocabulary, read in one device sync.
    Out of range, the loss would index past the LM head's output (a device-side assert on GPU)."""
    if is_compiling():
        return
    if input_ids is not None:
        check_token_tensor("input_ids", input_ids)  # first: 1-D ids would make 1-D labels look like the mistake
    inputs = input_ids if input_ids is not None else inputs_embeds
    if inputs is None:
        return  # the model refuses the call itself: it needs input_ids or inputs_embeds
    check_token_tensor("labels", labels)
    if labels.shape != inputs.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; it must match the input's (batch, sequence) "
            f"{tuple(inputs.shape[:2])}"
        )
    if labels.numel() == 0:
        return
    kept = labels.masked_fill(labels == -100, 0)
    low, high = torch.stack((kept.min(), kept.max())).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"labels contains {high if high >= vocab_size else low}: each label must be -100 (ignored) or a token id "
            f"in [0, {vocab_size})"
        )


# --------------------------------------------------------------------------------------------------------------------
# Multi-token prediction (DeepSeek-V3) and the causal-LM head


def multi_token_prediction_targets(labels: torch.Tensor, position_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets `[batch, seq - depth]` of MTP depth `depth`: position i predicts `labels[i + depth + 1]`, or nothing
    (-100) where that token lies past the end or in another document of a packed row.

    Packed rows restart `position_ids` at each document, so the target is in position i's document exactly when the
    positions count up to it without a restart: `position_ids[i + depth + 1] - position_ids[i] == depth + 1`. The main
    loss needs no such check: its one target across a boundary is a document's first token, labelled -100; at depth d
    the last d + 1 positions of a document predict across it. -100 labels in between are no criterion: SFT puts them
    on prompt tokens, inside the document. Contiguous positions (unpacked rows) keep every target."""
    same_document = position_ids[:, depth + 1 :] - position_ids[:, : -depth - 1] == depth + 1
    targets = labels[:, depth + 1 :].masked_fill(~same_document, -100)
    return F.pad(targets, (0, 1), value=-100)


# The training loss's logits alive at once (256 MiB in fp32): its chunks are this many over the vocabulary size rows
TRAINING_LOSS_CHUNK_LOGITS = 2**26


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(head(hidden_states), labels, ...)` (fp32 cross-entropy, -100 ignored, mean over
    the targets or sum / `num_items_in_batch`) without the `[tokens, vocab]` logits: the head and the cross-entropy
    run on `TRAINING_LOSS_CHUNK_LOGITS // vocab` rows at a time, and where there is more than one chunk each is
    recomputed in backward instead of kept. At 16k tokens and a 32k vocabulary the whole logits would take 1 GiB in
    bf16 and 2 GiB each for their fp32 copy, its log-softmax and its gradient; one chunk takes 256 MiB. The cost is
    the head's forward once more in backward: 2-3 % of a bench-moe training step by count, 20 % more time for a small
    model whose head is most of its compute (measured on a CPU), which is why a single chunk is not recomputed.

    Written here, not taken from a library: torch's chunked `linear_cross_entropy` (torch 2.13) and Liger's fused
    kernel take the head's weight, so they would drop a LoRA adapter or any other wrapper on the head; Liger needs
    Triton, and this file runs on every torch its Hub users have. `head` is called as a module, whatever wraps it."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = max(1, TRAINING_LOSS_CHUNK_LOGITS // vocab_size)
    if hidden.shape[0] <= rows:  # one chunk holds them all: recomputing it would cost time and save nothing
        total = _summed_cross_entropy(head, hidden, targets)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            total = total + checkpoint(
                _summed_cross_entropy,
                head,
                hidden[start : start + rows],
                targets[start : start + rows],
                use_reentrant=False,
                preserve_rng_state=False,  # the head draws no random numbers
            )
    if num_items_in_batch is None:
        return total / (targets != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class ApexMultiTokenPredictor(nn.Module):
    """One MTP depth: combines the previous depth's state at position i with the embedding of token i + depth, runs
    one decoder layer, and predicts token i + depth + 1 through the shared LM head."""

    def __init__(self, config: ApexConfig):
        super().__init__()
        self.hidden_norm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embedding_norm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layer = ApexDecoderLayer(config, config.num_physical_layers - 1)
        self.final_norm = ApexRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, next_token_embeds, attention_mask, position_embeddings, position_ids, cache=None):
        """`cache`: decoding only, a cache of this depth's own (its first layer holds the keys and values)."""
        hidden_states = self.input_proj(
            torch.cat((self.hidden_norm(hidden_states), self.embedding_norm(next_token_embeds)), dim=-1)
        )
        hidden_states = self.layer(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            **({CACHE_NAME: cache, "cache_index": 0} if cache is not None else {}),
        )
        return hidden_states


def crop_skips_empty_layers() -> bool:
    """Whether the installed transformers' `DynamicLayer.crop` leaves a layer that holds nothing alone (5.22 on);
    earlier versions slice its missing tensors. Feature-tested: Hub users run whatever version they have."""
    try:
        DynamicLayer().crop(-1)
    except (TypeError, AttributeError):
        return False
    return True


class ApexForCausalLM(ApexPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}
    draft_passes: int | None = None  # set on the view that `fewer_passes_draft` returns

    def __init__(self, config: ApexConfig):
        super().__init__(config)
        self.model = ApexModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.use_output_head(self.lm_head)
        if config.num_mtp_layers > 0:
            self.mtp = nn.ModuleList([ApexMultiTokenPredictor(config) for _ in range(config.num_mtp_layers)])
        self.post_init()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings
        self.model.use_output_head(new_embeddings)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_refinement_steps: int | None = None,
        refinement_exit_threshold: float | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ApexCausalLMOutputWithPast:
        check_forward_kwargs(type(self).__name__, kwargs)
        if labels is not None:
            check_labels(labels, input_ids, inputs_embeds, self.config.vocab_size)
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: ApexModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            num_refinement_steps=self.draft_passes if num_refinement_steps is None else num_refinement_steps,
            refinement_exit_threshold=refinement_exit_threshold,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # A training forward with labels builds no logits (as Liger's does): its loss is computed in chunks of the
        # hidden states (`chunked_causal_lm_loss`), and trainers read only the loss. Evaluation, and any forward
        # without gradients (nothing is kept for a backward there), returns the logits.
        whole_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        skip_logits = is_training_forward(self) and labels is not None and whole_logits
        logits = None if skip_logits else self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            if skip_logits:
                loss = self._next_token_loss(hidden_states, labels, **kwargs)
            else:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            if outputs.exit_hidden_states:
                exit_loss = self._exit_loss(outputs.exit_hidden_states, labels, **kwargs)
                loss = loss + self.config.refinement_exit_loss_coef * exit_loss

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            # The load-balancing loss is over this call's tokens; a cached generation step's mask covers the past too.
            balance_mask = attention_mask
            if not isinstance(balance_mask, torch.Tensor) or balance_mask.shape[-1] != hidden_states.shape[1]:
                balance_mask = None
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, balance_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        mtp_loss = None
        if loss is not None and hasattr(self, "mtp") and input_ids is not None:
            mtp_loss = self._multi_token_prediction_loss(
                hidden_states, input_ids, labels, attention_mask, position_ids, **kwargs
            )
            self.model.aux_losses["mtp_loss"] = mtp_loss.detach()
            loss = loss + self.config.mtp_loss_coef * mtp_loss

        return ApexCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            verifier_scores=outputs.verifier_scores,
            memory_states=outputs.memory_states,
            refinement_steps_used=outputs.refinement_steps_used,
            mtp_loss=mtp_loss,
        )

    def _exit_loss(self, exit_hidden_states, labels, **kwargs) -> torch.Tensor:
        """The exit loss (`refinement_exit_loss_coef`): the mean next-token loss of the earlier passes' exits."""
        losses = []
        for step, exit_state in enumerate(exit_hidden_states, start=1):
            losses.append(self._next_token_loss(exit_state, labels, **kwargs))
            self.model.aux_losses[f"exit_loss_pass{step}"] = losses[-1].detach()
        return torch.stack(losses).mean()

    def _next_token_loss(self, hidden_states, labels, **kwargs) -> torch.Tensor:
        """The LM head's next-token loss on `hidden_states`, chunked (`chunked_causal_lm_loss`); `kwargs` as the
        forward's (`num_items_in_batch`, `shift_labels`; the others do not concern the loss)."""
        return chunked_causal_lm_loss(
            self.lm_head,
            hidden_states,
            labels,
            self.vocab_size,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            shift_labels=kwargs.get("shift_labels"),
        )

    def _multi_token_prediction_loss(self, hidden_states, input_ids, labels, attention_mask, position_ids, **kwargs):
        """Depth d predicts token i + d + 1 from position i, on the positions where that token exists in the same
        document (see `multi_token_prediction_targets`)."""
        seq_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        embeds = self.model.embed(input_ids)
        losses = []
        for depth, predictor in enumerate(self.mtp, start=1):
            length = seq_len - depth
            if length < 2:
                break
            positions = position_ids[:, :length]
            padding = attention_mask[:, :length] if isinstance(attention_mask, torch.Tensor) else None
            hidden_states = predictor(
                hidden_states[:, :length],
                embeds[:, depth:],
                *self._mtp_attention_inputs(hidden_states[:, :length], padding, None, positions),
                positions,
            )
            targets = multi_token_prediction_targets(labels, position_ids, depth)
            losses.append(
                self._next_token_loss(
                    predictor.final_norm(hidden_states),
                    None,
                    shift_labels=targets,
                    num_items_in_batch=kwargs.get("num_items_in_batch"),
                )
            )
        return torch.stack(losses).mean() if losses else hidden_states.new_zeros(())

    def _mtp_attention_inputs(self, hidden_states, attention_mask, cache: Cache | None, position_ids) -> tuple:
        """The mask and RoPE of an MTP layer, which is built as the last physical layer (and has its type)."""
        layer_type = self.config.physical("layer_types")[self.config.num_physical_layers - 1]
        mask_function = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        mask = mask_function(self.config, hidden_states, attention_mask, cache, position_ids)  # positional (forward)
        return mask, self.model.position_embeddings(hidden_states, position_ids)[layer_type]

    def fewer_passes_draft(self, num_refinement_steps: int = 1) -> "ApexForCausalLM":
        """This model at fewer passes of its shared core, as the draft of transformers' assisted generation:
        `model.generate(ids, assistant_model=model.fewer_passes_draft(1))`. The draft proposes tokens at
        `num_refinement_steps` passes, this model verifies them at its own K, so greedy output is this model's own
        (self-speculation, as in Huginn and LayerSkip). Every weight and submodule is shared, nothing is copied: the
        view has its own config (its K), generation config (assisted generation tunes the draft's) and hooks."""
        passes = self.config.num_refinement_steps
        if not isinstance(num_refinement_steps, int) or not 1 <= num_refinement_steps < passes:
            raise ValueError(
                f"num_refinement_steps={num_refinement_steps!r} is invalid for a draft: fewer passes than this "
                f"model's num_refinement_steps={passes}, so 1..{passes - 1}"
            )
        if not crop_skips_empty_layers():
            raise RuntimeError(
                "assisted generation crops every cache layer after each round, and this transformers version fails "
                "on the layers a draft at fewer passes leaves empty (transformers >= 5.22 skips them): upgrade "
                "transformers, or use apex_hf.decoding.SelfSpeculativeDecoder"
            )
        draft = copy.copy(self)  # shares the submodules; the registries below are the view's own
        for registry in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks"):
            object.__setattr__(draft, registry, copy.copy(getattr(self, registry)))
        draft.config = copy.copy(self.config)
        draft.config.num_refinement_steps = num_refinement_steps
        draft.generation_config = copy.deepcopy(self.generation_config)
        draft.draft_passes = num_refinement_steps
        return draft

    @torch.no_grad()
    def predict_ahead(
        self,
        depth: int,
        hidden_states: torch.Tensor,
        ahead_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Drafts for speculative decoding (DeepSeek-V3's use of its MTP module): MTP depth `depth` (from 1) at each
        position i, reading `hidden_states` there (the model's last hidden states for depth 1, the previous depth's
        states otherwise) and token i + depth (`ahead_ids`, `[batch, seq]`). Returns this depth's states and its greedy
        guesses of token i + depth + 1. With `cache`, this depth's own (see `ApexMultiTokenPredictor.forward`), earlier
        positions are read from it and these are written to it; without, the call reads these positions only."""
        if not 1 <= depth <= self.config.num_mtp_layers:
            raise ValueError(
                f"depth={depth} is invalid: this model has num_mtp_layers={self.config.num_mtp_layers} multi-token "
                f"prediction depths (1..{self.config.num_mtp_layers}; none: train with num_mtp_layers >= 1)"
            )
        predictor = self.mtp[depth - 1]
        states = predictor(
            hidden_states,
            self.model.embed(ahead_ids),
            *self._mtp_attention_inputs(hidden_states, None, cache, position_ids),
            position_ids,
            cache=cache,
        )
        return states, self.lm_head(predictor.final_norm(states)).argmax(-1)


__all__ = ["ApexPreTrainedModel", "ApexModel", "ApexForCausalLM"]
