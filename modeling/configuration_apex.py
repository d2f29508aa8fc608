"""Apex model configuration.

Apex is a decoder-only LM whose physical stack is `prelude -> core x K -> coda`: the core layers are shared and run
`num_refinement_steps` times, with a per-token verifier and a per-token "spiral memory" between passes. Each pass of
the core is one *unrolled* layer for the purposes of the KV cache, `layer_types` and `output_hidden_states`, so
`num_hidden_layers` is the unrolled depth `P + K_max * C + D` and transformers' cache classes size themselves with no
special cache class.

This file is copied verbatim to the Hub next to the weights: it imports only torch / transformers / huggingface_hub.
"""

import copy
import difflib
import functools
import math
from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import (
    StrictDataclassClassValidationError,
    StrictDataclassError,
    StrictDataclassFieldValidationError,
)
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters


ATTENTION_TYPES = ("gqa", "mla")
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")  # the gate activations of SwiGLU / GeGLU
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_LAYER_TYPES = ("dense", "sparse")
ROUTER_SCORING = ("softmax", "sigmoid")
ATTENTION_OUTPUT_GATES = ("none", "headwise", "elementwise")
MEMORY_INJECTIONS = ("none", "gated_add", "cross_attention")
REFINEMENT_INPUT_INJECTIONS = ("none", "add", "scaled_add", "adapter")
REFINEMENT_STATE_NORMS = ("none", "every_pass", "before_coda")
REFINEMENT_SAMPLINGS = ("fixed", "uniform", "poisson")
# "dynamic" grows its frequencies past the trained length; every other type has a hard maximum position.
ROPE_TYPES_WITHOUT_LENGTH_LIMIT = ("dynamic",)


class ApexConfigError(ValueError, StrictDataclassClassValidationError, StrictDataclassFieldValidationError):
    """A nonsense configuration value, named with the allowed range. One class for every config error, raised by
    construction, `validate()` (which `save_pretrained` runs) and assignment alike: a `ValueError`, as documented and
    as the CLI catches, and still the error classes of huggingface_hub's strict dataclasses, for callers that catch
    those. Its message is the validator's own, without huggingface_hub's "Class validation error for ..." header."""


# The allowed range of every numeric field: (text for the message, test). `None` is allowed exactly where the field's
# type allows it (the strict dataclass checks types first). Relations between fields (max_refinement_steps >= K,
# num_experts_per_tok <= num_experts, ...) are checked by the `validate_apex_*` methods.
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_AT_LEAST_1 = (">= 1", lambda v: v >= 1)
_POSITIVE = ("> 0", lambda v: v > 0)
_LOSS_COEF = (">= 0 (a loss coefficient)", lambda v: v >= 0)
_FRACTION = ("in (0, 1]", lambda v: 0 < v <= 1)
_FINITE = ("a finite number", lambda v: True)
FIELD_RANGES: dict[str, tuple[str, Callable]] = {
    **dict.fromkeys(
        (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "sliding_window",
            "full_attention_interval",
            "moe_layer_freq",
            "moe_intermediate_size",
            "n_group",
            "topk_group",
            "num_core_layers",
            "num_refinement_steps",
            "max_refinement_steps",
            "num_hidden_layers",
            "refinement_dim",
            "refinement_sampling_min",
            "refinement_sampling_max",
            "refinement_backprop_steps",
        ),
        _AT_LEAST_1,
    ),
    **dict.fromkeys(
        (
            "first_k_dense_replace",
            "num_experts",
            "num_shared_experts",
            "num_prelude_layers",
            "num_coda_layers",
            "num_mtp_layers",
            "initializer_range",
            "router_bias_update_rate",
            "refinement_exit_threshold",
        ),
        _AT_LEAST_0,
    ),
    **dict.fromkeys(
        (
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "verifier_loss_coef",
            "consistency_loss_coef",
            "refinement_exit_loss_coef",
            "mtp_loss_coef",
        ),
        _LOSS_COEF,
    ),
    **dict.fromkeys(
        (
            "rms_norm_eps",
            "embedding_multiplier",
            "query_pre_attn_scalar",
            "routed_scaling_factor",
            "swiglu_limit",
            "swiglu_alpha",
            "expert_capacity_factor",
        ),
        _POSITIVE,
    ),
    "num_experts_per_tok": _AT_LEAST_1,
    "partial_rotary_factor": _FRACTION,
    "attention_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
}

# The numeric RoPE parameters transformers' rotary functions read, with their ranges. A factor below 1 compresses
# positions (odd, but defined); 0 or below divides by zero or flips the rotation.
ROPE_RANGES: dict[str, tuple[str, Callable]] = {
    "rope_theta": _POSITIVE,
    "factor": _POSITIVE,
    "original_max_position_embeddings": _AT_LEAST_1,
    "attention_factor": _POSITIVE,
    "beta_fast": _POSITIVE,
    "beta_slow": _POSITIVE,
    "low_freq_factor": _POSITIVE,
    "high_freq_factor": _POSITIVE,
    "partial_rotary_factor": _FRACTION,
    "mscale": _FINITE,
    "mscale_all_dim": _FINITE,
}
ROPE_LIST_KEYS = ("short_factor", "long_factor")  # longrope: one positive factor per rotary frequency
# Every key some rope_type reads: an unknown key close to one of these is a misspelling (`rope_thta` would otherwise
# be ignored and the default used); other unknown keys are left to transformers, which warns.
ROPE_KEYS = ("rope_type", "type", "truncate", *ROPE_RANGES, *ROPE_LIST_KEYS)


def _require(ok: bool, field: str, value, allowed) -> None:
    if not ok:
        raise ApexConfigError(f"{field}={value!r} is invalid: must be {_allowed_text(value, allowed)}")


def _allowed_text(value, allowed) -> str:
    """The allowed values; for a choice, the closest one too, as a misspelt name (`gated-add`) usually is."""
    if not isinstance(allowed, tuple):
        return allowed
    close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
    return f"one of {allowed}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(field: str, value, allowed: tuple[str, Callable]) -> None:
    text, test = allowed
    if not _is_number(value):
        raise ApexConfigError(f"{field}={value!r} is invalid: must be a number {text}")
    _require(math.isfinite(value) and test(value), field, value, text)


def _raising_config_errors(method: Callable) -> Callable:
    """`method` with huggingface_hub's strict-dataclass errors turned into `ApexConfigError` carrying the validator's
    own message (which names the field), so every config error is one class and reads as one line."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ApexConfigError:
            raise
        except StrictDataclassError as error:
            cause = error.__cause__
            if isinstance(cause, ApexConfigError):
                raise cause from None
            message = str(cause) if cause is not None else str(error)
            raise ApexConfigError(f"{type(self).__name__}: {message}") from error

    return checked


def _one_error_class(cls):
    """Route construction, `validate()` and assignment through `_raising_config_errors` (applied over `@strict`)."""
    for name in ("__init__", "validate", "__setattr__"):
        setattr(cls, name, _raising_config_errors(getattr(cls, name)))
    return cls


def sliding_full_pattern(num_layers: int, full_attention_interval: int) -> list[str]:
    """`layer_types` for `num_layers` physical layers where every `full_attention_interval`-th layer (1-based) is
    global and the rest slide, e.g. interval 4 gives `sliding, sliding, sliding, full, sliding, ...`."""
    if full_attention_interval < 1:
        raise ApexConfigError(f"full_attention_interval must be >= 1, got {full_attention_interval}")
    return [
        "full_attention" if (i + 1) % full_attention_interval == 0 else "sliding_attention" for i in range(num_layers)
    ]


def unrolled_physical_layers(
    num_prelude_layers: int, num_core_layers: int, num_coda_layers: int, max_refinement_steps: int
) -> list[int]:
    """The physical layer behind each unrolled layer: the prelude, the core once per pass, the coda."""
    core_start, coda_start = num_prelude_layers, num_prelude_layers + num_core_layers
    return [
        *range(core_start),
        *list(range(core_start, coda_start)) * max_refinement_steps,
        *range(coda_start, coda_start + num_coda_layers),
    ]


@_one_error_class
@strict
class ApexConfig(PreTrainedConfig):
    r"""
    Configuration of an Apex model. Every knob has a default; nonsense values raise `ApexConfigError` (a `ValueError`)
    naming the field, the value and the allowed range (`FIELD_RANGES`, `ROPE_RANGES`).

    Trunk:
        vocab_size, hidden_size, num_attention_heads, num_key_value_heads, head_dim (GQA head size; for MLA it is
        derived as `qk_rope_head_dim`, the rotary size, as in transformers' DeepSeek-V3), intermediate_size (dense
        SwiGLU width), hidden_act, rms_norm_eps, initializer_range, max_position_embeddings, partial_rotary_factor
        (fraction of each GQA head that is rotated), attention_dropout, tie_word_embeddings, use_cache, pad/bos/eos
        token ids.
        rope_parameters: `rope_type` one of default / linear / dynamic / yarn / llama3 / longrope, `rope_theta`, ...;
            or, as in transformers' Gemma 3, one such dict per attention layer type
            (`{"full_attention": {...}, "sliding_attention": {...}}`), so global and local layers rotate differently.
        embedding_multiplier: the token embeddings are multiplied by it (Gemma 3 uses `sqrt(hidden_size)`).
        sandwich_norms: an extra RMSNorm on the attention output and on the MLP output, before each is added to the
            residual (`post_self_attn_layernorm`, `post_mlp_layernorm`; Gemma 3, GLM-4).

    Attention (per layer):
        attention_type: `"gqa"` (MHA and MQA are GQA with `num_key_value_heads` = heads or 1) or `"mla"` (DeepSeek
            multi-head latent attention, needs `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`;
            `q_lora_rank=None` uses a full-rank query projection). MLA caches the compressed latent, not full K/V.
        layer_types: one of `full_attention` / `sliding_attention` per *unrolled* layer. Leave it `None` and set
            `sliding_window` + `full_attention_interval` to build "full every n-th physical layer"; with no
            `sliding_window` every layer is full. A given core layer must have the same type in every pass.
        sliding_window: window size of sliding layers.
        qk_norm: RMSNorm on each query / key head before RoPE (Qwen3, Gemma 3). GQA only.
        attention_bias: biases on the query, key, value and output projections (Llama's convention);
            attention_output_bias overrides it for the output projection alone (GLM-4 and Qwen2 bias q/k/v only).
        query_pre_attn_scalar: attention logits are scaled by `query_pre_attn_scalar ** -0.5` instead of
            `head_dim ** -0.5` (Gemma 3). GQA only.
        attention_sinks: one learned logit per head that joins every softmax as an extra key with a zero value, so a
            head can attend to nothing (GPT-OSS). Eager, flex and flash attention; SDPA cannot express it.
        attention_output_gate: `"none"`, `"headwise"` (one sigmoid gate per head) or `"elementwise"` (one per
            channel), computed from the layer input and applied to the attention output before `o_proj` (Qwen3-Next
            gated attention).

    Feed-forward (per layer):
        mlp_layer_types: `dense` / `sparse` per unrolled layer; `None` derives it from `num_experts`,
            `first_k_dense_replace` (the first k *physical* layers are dense) and `moe_layer_freq` (then every n-th
            physical layer is sparse).
        num_experts (0 = no MoE), num_experts_per_tok, moe_intermediate_size, num_shared_experts (always-on experts
            of width `moe_intermediate_size` each, fused into one SwiGLU), router_scoring (`softmax` | `sigmoid`),
            norm_topk_prob, routed_scaling_factor, n_group / topk_group (group-limited routing: experts are split
            into `n_group` groups and only the best `topk_group` groups are eligible).
        router_bias: a learned bias on the router logits, used for selection and mixing alike (GPT-OSS).
        expert_bias: biases on each routed expert's projections (GPT-OSS).
        swiglu_limit, swiglu_alpha: `swiglu_limit=None` gives routed experts the plain `act(gate) * up`; a number
            gives GPT-OSS's clamped form `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with
            `g = clamp(gate, max=limit)`.
        router_aux_loss_coef: Switch load-balancing loss on the router logits (transformers convention: added by the
            causal-LM head, and by TRL, when `output_router_logits`).
        router_bias_update_rate: aux-loss-free balancing (DeepSeek-V3). The router keeps `e_score_correction_bias`,
            added to the scores for expert *selection* only; in training the load of each forward is accumulated and,
            at the start of the next training forward, the bias moves by `rate * sign(mean_load - load)`. It never
            moves in eval, so evaluation is deterministic. 0 disables it.
        router_z_loss_coef: ST-MoE router z-loss `mean(logsumexp(logits)^2)`.
        expert_capacity_factor: token dropping, training only (`None` = off). Each expert takes at most
            `ceil(factor * tokens * k / num_experts)` assignments per forward, in token order; the rest are dropped.
            Dropping makes a token's output depend on which *other* tokens, later ones included, chose the same
            expert: it breaks causality and batch invariance, which is why it is off by default and ignored in eval.

    Refinement loop (the Apex core):
        num_prelude_layers (P), num_core_layers (C), num_coda_layers (D), num_refinement_steps (K, default passes),
        max_refinement_steps (K_max >= K: the passes the cache has room for, so K can be raised at inference up to
        it). `num_hidden_layers` is derived as `P + K_max * C + D`; passing a contradicting value is an error.
        memory_injection: `"none"` (the loop is a plain weight-shared recurrence; with K = 1 the model is exactly a
            standard decoder), `"gated_add"` (the spiral memory is added to the next pass's input and the coda's
            through a learned per-channel gate) or `"cross_attention"` (each token attends over its *own* memory
            history M_1..M_k, which is causal by construction and needs no cache).
        refinement_pass_gate: every pass after the first moves the hidden state only by a learned per-channel
            fraction of its update, `h + g_k * (core(h) - h)`, `g_k` initialised to 1. Upcycling a single-pass model
            sets `g_k = 0`, which makes the extra passes identities at initialisation.
        refinement_state_norm: where one RMSNorm bounds the loop state: `"none"`, `"every_pass"` (after every pass,
            as Huginn's blocks normalise their residual stream) or `"before_coda"` (the loop's output, before the coda
            and every exit read it). Without it the residual stream grows with every pass, so a model run past its
            trained K reads states larger than any it trained on.
        refinement_dim: width of the proposal / review / refinement projections.
        refinement_verifier: build the per-token verifier (`None`, the default: exactly when there is a memory, which
            reads its score). `True` without the memory gives early exit to a loop that needs no memory.
        verifier_loss_coef: weight of the verifier loss. The verifier predicts, per token and pass, how close this
            pass's next-token distribution already is to the model's final one, `exp(-KL(final || pass))`: a halting
            target that needs no labels and whose -log bounds the expected loss increase of stopping there, so
            generation can skip passes where it is confident. The pass's distribution is its exit read out through
            the coda when the exit loss trains (`refinement_exit_loss_coef`), else its logit lens (final norm + LM
            head on the pass's state).
        consistency_loss_coef: weight of `1 - cos(h_k, h_{k+1})` between consecutive passes (pushes the loop towards
            a fixed point, which makes early exit safe).

    Loop training recipe (read by `ApexModel.forward` in training mode, i.e. `model.train()` with gradients on, so
    every trainer gets it; evaluation and generation always run `num_refinement_steps` or the per-call value):
        refinement_input_injection: how the prelude output e re-enters every pass after the first (Huginn's input
            injection, which keeps the loop anchored to its input): `"none"`, `"add"` (h + e), `"scaled_add"`
            ((h + e) / sqrt(2), which keeps the state's scale from growing with every pass) or `"adapter"`
            (`W [h; e]`, initialised to h + e). With K = 1 it never runs, so conversion parity is unaffected.
        refinement_sampling: passes per training forward: `"fixed"` (num_refinement_steps), `"uniform"` (an integer
            in [refinement_sampling_min, refinement_sampling_max]) or `"poisson"` (1 + Poisson(num_refinement_steps -
            1), clipped to those bounds). Training at several depths is what lets inference choose K. The draw
            depends only on a counter of training forwards, so every data-parallel rank runs the same K.
        refinement_sampling_min / refinement_sampling_max: bounds of the draw; default 1 and max_refinement_steps.
        refinement_backprop_steps: backpropagate through only the last n passes (truncated backpropagation through
            the loop, as Huginn); earlier passes run without gradients, which saves their activations and backward.
            `None` = all passes.
        refinement_exit_loss_coef: weight of the exit loss (Ouro's loss over exits). In a training forward every
            pass but the last is also read out through the coda, as if each token left the loop there; with labels,
            the mean of those exits' next-token losses is added to the loss with this weight. It trains every pass to
            be a usable exit (early exit, and a smaller K at inference), and the verifier's target becomes the exit's
            own distribution's closeness to the final one. Costs one coda run per earlier pass. 0 = off.

    Early exit (inference):
        refinement_exit_threshold: a token leaves the loop after the first pass whose verifier score reaches it
            (`None` = off; overridable per call). Skipped passes keep a KV entry (the token's latest computed pass),
            so cached generation equals recomputation with the same exits; outputs report `refinement_steps_used`.
            0 exits every token after pass 1 (the logits of `num_refinement_steps=1`); above 1 nobody exits. Needs
            the verifier (`refinement_verifier`).
        Auxiliary losses (verifier, consistency, router z-loss) are attached to the activations with an identity
        autograd function that adds their gradient in backward, so they also train when a trainer (TRL) runs only
        the backbone and its own LM head. Their values are kept in `ApexModel.aux_losses` for logging.

    Optional heads:
        num_mtp_layers: DeepSeek-V3 multi-token prediction depth (auxiliary loss on token t+1+d), weighted by
            `mtp_loss_coef`.
    """

    model_type = "apex"
    keys_to_ignore_at_inference = ["past_key_values"]

    # The parallel plans follow qwen3_moe / deepseek_v3. Layers are physical layers (`layers.*`); the core is reused
    # across passes, so a TP / EP plan shards it once. The pipeline plan splits `layers` in order, which matches the
    # forward only for K = 1: with K > 1 the core is re-entered, so a pipeline stage must hold the whole core.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.output_gate.proj": "colwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    # trunk
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 4096
    rope_parameters: RopeParameters | dict | None = None
    partial_rotary_factor: float = 1.0
    embedding_multiplier: float = 1.0
    sandwich_norms: bool = False
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float | int = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # attention
    attention_type: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    full_attention_interval: int | None = None
    qk_norm: bool = False
    query_pre_attn_scalar: float | int | None = None
    attention_sinks: bool = False
    attention_output_gate: str = "none"

    # feed-forward
    mlp_layer_types: list[str] | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 704
    num_shared_experts: int = 0
    router_scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | int | None = None
    swiglu_alpha: float = 1.702
    router_aux_loss_coef: float = 0.001
    router_bias_update_rate: float = 0.0
    router_z_loss_coef: float = 0.0
    expert_capacity_factor: float | None = None
    output_router_logits: bool = False

    # refinement loop
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_coda_layers: int = 2
    num_refinement_steps: int = 1
    max_refinement_steps: int | None = None
    num_hidden_layers: int | None = None
    memory_injection: str = "none"
    refinement_verifier: bool | None = None
    refinement_pass_gate: bool = False
    refinement_state_norm: str = "none"
    refinement_dim: int | None = None
    verifier_loss_coef: float = 0.1
    consistency_loss_coef: float = 0.0
    refinement_input_injection: str = "none"
    refinement_sampling: str = "fixed"
    refinement_sampling_min: int = 1
    refinement_sampling_max: int | None = None
    refinement_backprop_steps: int | None = None
    refinement_exit_loss_coef: float = 0.0
    refinement_exit_threshold: float | None = None

    # optional heads
    num_mtp_layers: int = 0
    mtp_loss_coef: float = 0.3

    def __post_init__(self, **kwargs):
        # Ranges first: the layout below divides by moe_layer_freq and multiplies the layer counts.
        self.validate_apex_ranges()
        if self.rope_parameters is not None:  # standardisation fills it in place; leave the caller's dict alone
            self.rope_parameters = copy.deepcopy(dict(self.rope_parameters))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.max_refinement_steps is None:
            self.max_refinement_steps = self.num_refinement_steps
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.attention_type == "mla":
            # transformers' RoPE helpers read `head_dim` as the rotary size; for MLA that is the decoupled rope part.
            self.head_dim = self.qk_rope_head_dim
        elif self.head_dim is None:
            if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
                raise ApexConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; fix one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.refinement_dim is None:
            self.refinement_dim = max(self.hidden_size // 4, 1)

        unrolled = self.num_prelude_layers + self.max_refinement_steps * self.num_core_layers + self.num_coda_layers
        if self.num_hidden_layers is not None and self.num_hidden_layers != unrolled:
            raise ApexConfigError(
                f"num_hidden_layers={self.num_hidden_layers} contradicts the refinement loop: it must equal "
                f"num_prelude_layers + max_refinement_steps * num_core_layers + num_coda_layers = "
                f"{self.num_prelude_layers} + {self.max_refinement_steps} * {self.num_core_layers} + "
                f"{self.num_coda_layers} = {unrolled} (leave it unset to derive it)"
            )
        self.num_hidden_layers = unrolled

        if self.layer_types is None:
            if self.sliding_window is None:
                physical_types = ["full_attention"] * self.num_physical_layers
            elif self.full_attention_interval is None:
                physical_types = ["sliding_attention"] * self.num_physical_layers
            else:
                physical_types = sliding_full_pattern(self.num_physical_layers, self.full_attention_interval)
            self.layer_types = self.unroll(physical_types)
        if self.mlp_layer_types is None:
            physical_mlp = [
                "sparse"
                if self.num_experts > 0 and i >= self.first_k_dense_replace and (i + 1) % self.moe_layer_freq == 0
                else "dense"
                for i in range(self.num_physical_layers)
            ]
            self.mlp_layer_types = self.unroll(physical_mlp)
        self.base_model_tp_plan = self._tp_plan_for_this_config()
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs):
        # transformers 5.17 - 5.22 put `rope_theta` and `partial_rotary_factor` at the top of `rope_parameters` even
        # when it is nested per layer type, which its own validation then rejects. Nested dicts only need the
        # per-type standardisation.
        if not self.rope_per_layer_type:
            return super().convert_rope_params_to_dict(**kwargs)
        kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_theta", None)
        self.standardize_rope_params()
        return kwargs

    def _tp_plan_for_this_config(self) -> dict[str, str]:
        """The class-level plan minus the entries for modules this configuration does not build. MLA attention stays
        replicated, as in transformers' DeepSeek-V3: its heads come out of `q_b_proj` / `kv_b_proj`, so a rowwise
        `o_proj` alone would be fed unsharded input. Set per instance; `to_dict` never writes it to config.json."""
        unused = set()
        if self.attention_type == "mla":
            unused |= {"q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "o_proj", "output_gate.proj"}
        if not self.qk_norm:
            unused |= {"q_norm", "k_norm"}
        if self.attention_output_gate == "none":
            unused |= {"output_gate.proj"}
        unused = {f"layers.*.self_attn.{name}" for name in unused}
        if "dense" not in self.mlp_layer_types:
            unused |= {f"layers.*.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
        if "sparse" not in self.mlp_layer_types:
            unused |= {f"layers.*.mlp.experts{name}" for name in ("", ".gate_up_proj", ".down_proj")}
        if "sparse" not in self.mlp_layer_types or self.num_shared_experts == 0:
            unused |= {f"layers.*.mlp.shared_experts.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
        return {key: value for key, value in type(self).base_model_tp_plan.items() if key not in unused}

    # ----------------------------------------------------------------------------------------------------------------
    # Unrolled <-> physical layer indices

    @property
    def num_physical_layers(self) -> int:
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def unrolled_coda_start(self) -> int:
        """Unrolled index of the first coda layer: after `max_refinement_steps` passes' slots of the core."""
        return self.num_prelude_layers + self.max_refinement_steps * self.num_core_layers

    def unrolled_core_index(self, step: int, core_index: int) -> int:
        """Unrolled index (and cache slot) of core layer `core_index` in pass `step` (both from 0)."""
        return self.num_prelude_layers + step * self.num_core_layers + core_index

    def physical_layer_index(self, unrolled_index: int) -> int:
        """The physical layer that computes unrolled layer `unrolled_index`."""
        prelude, core = self.num_prelude_layers, self.num_core_layers
        if unrolled_index < prelude:
            return unrolled_index
        if unrolled_index < self.unrolled_coda_start:
            return prelude + (unrolled_index - prelude) % core
        return unrolled_index - self.unrolled_coda_start + prelude + core

    def first_unrolled_index(self, physical_index: int) -> int:
        """The unrolled index of a physical layer's first use (its first pass, for a core layer)."""
        if physical_index < self.num_prelude_layers + self.num_core_layers:
            return physical_index
        return physical_index + (self.max_refinement_steps - 1) * self.num_core_layers

    def unroll(self, per_physical_layer: list) -> list:
        """Expand a per-physical-layer list to one entry per unrolled layer."""
        layout = (self.num_prelude_layers, self.num_core_layers, self.num_coda_layers, self.max_refinement_steps)
        return [per_physical_layer[p] for p in unrolled_physical_layers(*layout)]

    def sliding_window_of(self, physical_index: int) -> int | None:
        """The attention window of a physical layer: `sliding_window` for sliding layers, `None` for full ones."""
        return self.sliding_window if self.physical("layer_types")[physical_index] == "sliding_attention" else None

    def physical(self, field: str) -> list:
        """A per-unrolled-layer field (`layer_types`, `mlp_layer_types`) as one entry per physical layer."""
        values = getattr(self, field)
        return [values[self.first_unrolled_index(p)] for p in range(self.num_physical_layers)]

    # ----------------------------------------------------------------------------------------------------------------
    # Validation: `@strict` runs every `validate_*` method at init and in `save_pretrained`.

    def validate_apex_ranges(self):
        for field, allowed in FIELD_RANGES.items():
            value = getattr(self, field)
            if value is not None:
                _check_range(field, value, allowed)

    def validate_apex_rope(self):
        """Every RoPE parameter's range (transformers only warns), and a misspelt key named with the right one."""
        rope_parameters = self.rope_parameters or {}
        per_type = {
            f"rope_parameters[{t!r}]": rope_parameters[t] for t in rope_parameters if t in ATTENTION_LAYER_TYPES
        }
        for where, parameters in (per_type or {"rope_parameters": rope_parameters}).items():
            if parameters is None:
                continue
            for key, value in parameters.items():
                if key in ROPE_RANGES and value is not None:
                    _check_range(f"{where}.{key}", value, ROPE_RANGES[key])
                elif key in ROPE_LIST_KEYS and value is not None:
                    _require(
                        isinstance(value, list) and all(_is_number(v) and v > 0 for v in value),
                        f"{where}.{key}",
                        value,
                        "a list of numbers > 0",
                    )
                elif key not in ROPE_KEYS and (close := difflib.get_close_matches(key, ROPE_KEYS, n=1)):
                    raise ApexConfigError(f"{where} has an unknown key {key!r} (did you mean {close[0]!r}?)")

    def validate_apex_trunk(self):
        for field in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _require(getattr(self, field) >= 1, field, getattr(self, field), ">= 1")
        _require(self.intermediate_size >= 1, "intermediate_size", self.intermediate_size, ">= 1")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        _require(self.initializer_range >= 0, "initializer_range", self.initializer_range, ">= 0")
        _require(0 <= self.attention_dropout < 1, "attention_dropout", self.attention_dropout, "in [0, 1)")
        _require(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor", self.partial_rotary_factor, "in (0, 1]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ApexConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention shares each KV head by a whole group)"
            )
        for layer_type in sorted(set(self.layer_types)):
            if self.rope_per_layer_type and not isinstance(self.rope_parameters.get(layer_type), dict):
                raise ApexConfigError(
                    f"rope_parameters is given per layer type ({sorted(self.rope_parameters)}) but has no dict for "
                    f"{layer_type!r}, which layer_types uses"
                )
            rope_type = self.rope_parameters_of(layer_type).get("rope_type", "default")
            rope_types = ("default", *sorted(ROPE_INIT_FUNCTIONS))
            _require(rope_type in rope_types, "rope_parameters.rope_type", rope_type, rope_types)
        _require(self.embedding_multiplier > 0, "embedding_multiplier", self.embedding_multiplier, "> 0")
        _require(self.hidden_act in HIDDEN_ACTS, "hidden_act", self.hidden_act, HIDDEN_ACTS)

    def validate_apex_attention(self):
        _require(self.attention_type in ATTENTION_TYPES, "attention_type", self.attention_type, ATTENTION_TYPES)
        _require(
            self.attention_output_gate in ATTENTION_OUTPUT_GATES,
            "attention_output_gate",
            self.attention_output_gate,
            ATTENTION_OUTPUT_GATES,
        )
        if self.attention_type == "gqa":
            _require(self.head_dim is not None and self.head_dim >= 1, "head_dim", self.head_dim, ">= 1")
            rotary = int(self.head_dim * self.partial_rotary_factor)
            if rotary < 2 or rotary % 2:
                raise ApexConfigError(
                    f"partial_rotary_factor={self.partial_rotary_factor} gives a rotary size of {rotary} for "
                    f"head_dim={self.head_dim}; it must be an even number >= 2"
                )
        else:
            for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, field)
                if value is None or value < 1:
                    raise ApexConfigError(f"attention_type='mla' needs {field} >= 1, got {value}")
            if self.q_lora_rank is not None:
                _require(self.q_lora_rank >= 1, "q_lora_rank", self.q_lora_rank, ">= 1 or None")
            if self.qk_rope_head_dim % 2:
                raise ApexConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
            for field in ("qk_norm", "query_pre_attn_scalar", "attention_sinks"):
                if getattr(self, field):
                    raise ApexConfigError(f"{field} is only defined for attention_type='gqa'")
            if self.partial_rotary_factor != 1.0:
                raise ApexConfigError(
                    "partial_rotary_factor does not apply to MLA; size the rope part with qk_rope_head_dim"
                )
        if self.query_pre_attn_scalar is not None:
            _require(
                self.query_pre_attn_scalar > 0, "query_pre_attn_scalar", self.query_pre_attn_scalar, "> 0 or None"
            )
        if self.sliding_window is not None:
            _require(self.sliding_window >= 1, "sliding_window", self.sliding_window, ">= 1 or None")
        bad = [t for t in self.layer_types if t not in ATTENTION_LAYER_TYPES]
        if bad:
            raise ApexConfigError(f"layer_types entries must be in {ATTENTION_LAYER_TYPES}, got {sorted(set(bad))}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ApexConfigError("layer_types has 'sliding_attention' layers but sliding_window is None")
        self._validate_unrolled_list("layer_types")

    def validate_apex_moe(self):
        bad = [t for t in self.mlp_layer_types if t not in MLP_LAYER_TYPES]
        if bad:
            raise ApexConfigError(f"mlp_layer_types entries must be in {MLP_LAYER_TYPES}, got {sorted(set(bad))}")
        self._validate_unrolled_list("mlp_layer_types")
        _require(self.num_experts >= 0, "num_experts", self.num_experts, ">= 0")
        _require(self.first_k_dense_replace >= 0, "first_k_dense_replace", self.first_k_dense_replace, ">= 0")
        _require(self.moe_layer_freq >= 1, "moe_layer_freq", self.moe_layer_freq, ">= 1")
        for field in (
            "router_aux_loss_coef",
            "router_bias_update_rate",
            "router_z_loss_coef",
            "verifier_loss_coef",
            "consistency_loss_coef",
            "refinement_exit_loss_coef",
            "mtp_loss_coef",
        ):
            _require(getattr(self, field) >= 0, field, getattr(self, field), ">= 0 (a loss coefficient)")
        if self.num_experts == 0 and "sparse" not in self.mlp_layer_types:
            return
        _require(self.num_experts >= 1, "num_experts", self.num_experts, ">= 1 when any mlp_layer_types is 'sparse'")
        _require(
            1 <= self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            self.num_experts_per_tok,
            f"in [1, num_experts={self.num_experts}]",
        )
        _require(self.moe_intermediate_size >= 1, "moe_intermediate_size", self.moe_intermediate_size, ">= 1")
        _require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, ">= 0")
        _require(self.router_scoring in ROUTER_SCORING, "router_scoring", self.router_scoring, ROUTER_SCORING)
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "> 0")
        _require(
            self.n_group >= 1 and self.num_experts % self.n_group == 0,
            "n_group",
            self.n_group,
            f"a divisor of num_experts={self.num_experts}",
        )
        _require(
            1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group, f"in [1, n_group={self.n_group}]"
        )
        eligible = self.topk_group * self.num_experts // self.n_group
        if self.num_experts_per_tok > eligible:
            raise ApexConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {eligible} experts that group-limited "
                f"routing leaves eligible (topk_group={self.topk_group} of n_group={self.n_group} groups)"
            )
        if self.swiglu_limit is not None:
            _require(self.swiglu_limit > 0, "swiglu_limit", self.swiglu_limit, "> 0 or None")
        if self.expert_capacity_factor is not None:
            _require(
                self.expert_capacity_factor > 0, "expert_capacity_factor", self.expert_capacity_factor, "> 0 or None"
            )

    def validate_apex_refinement(self):
        _require(self.num_prelude_layers >= 0, "num_prelude_layers", self.num_prelude_layers, ">= 0")
        _require(self.num_core_layers >= 1, "num_core_layers", self.num_core_layers, ">= 1")
        _require(self.num_coda_layers >= 0, "num_coda_layers", self.num_coda_layers, ">= 0")
        _require(self.num_refinement_steps >= 1, "num_refinement_steps", self.num_refinement_steps, ">= 1")
        _require(
            self.max_refinement_steps >= self.num_refinement_steps,
            "max_refinement_steps",
            self.max_refinement_steps,
            f">= num_refinement_steps={self.num_refinement_steps}",
        )
        _require(
            self.memory_injection in MEMORY_INJECTIONS, "memory_injection", self.memory_injection, MEMORY_INJECTIONS
        )
        _require(self.refinement_dim >= 1, "refinement_dim", self.refinement_dim, ">= 1")
        _require(
            self.refinement_verifier is not False or self.memory_injection == "none",
            "refinement_verifier",
            self.refinement_verifier,
            f"True with memory_injection={self.memory_injection!r} (the memory update reads the verifier's score)",
        )
        _require(
            self.refinement_input_injection in REFINEMENT_INPUT_INJECTIONS,
            "refinement_input_injection",
            self.refinement_input_injection,
            REFINEMENT_INPUT_INJECTIONS,
        )
        _require(
            self.refinement_state_norm in REFINEMENT_STATE_NORMS,
            "refinement_state_norm",
            self.refinement_state_norm,
            REFINEMENT_STATE_NORMS,
        )
        _require(
            self.refinement_sampling in REFINEMENT_SAMPLINGS,
            "refinement_sampling",
            self.refinement_sampling,
            REFINEMENT_SAMPLINGS,
        )
        _require(
            1 <= self.refinement_sampling_min <= self.sampled_passes_max <= self.max_refinement_steps,
            "refinement_sampling_min/max",
            (self.refinement_sampling_min, self.refinement_sampling_max),
            f"1 <= min <= max <= max_refinement_steps={self.max_refinement_steps}",
        )
        if self.refinement_exit_threshold is not None:
            _require(
                self.refinement_exit_threshold >= 0,
                "refinement_exit_threshold",
                self.refinement_exit_threshold,
                ">= 0 or None (off)",
            )
            _require(
                self.has_refinement_verifier,
                "refinement_exit_threshold",
                self.refinement_exit_threshold,
                "None without the verifier it reads (set refinement_verifier=True)",
            )
        if self.refinement_backprop_steps is not None:
            _require(
                self.refinement_backprop_steps >= 1,
                "refinement_backprop_steps",
                self.refinement_backprop_steps,
                ">= 1 or None (all passes)",
            )
        _require(self.num_mtp_layers >= 0, "num_mtp_layers", self.num_mtp_layers, ">= 0")

    def _validate_unrolled_list(self, field: str):
        values = getattr(self, field)
        if len(values) != self.num_hidden_layers:
            raise ApexConfigError(
                f"{field} has {len(values)} entries but the model has {self.num_hidden_layers} unrolled layers "
                f"(num_prelude_layers + max_refinement_steps * num_core_layers + num_coda_layers)"
            )
        for unrolled, value in enumerate(values):
            first = values[self.first_unrolled_index(self.physical_layer_index(unrolled))]
            if value != first:
                raise ApexConfigError(
                    f"{field}[{unrolled}]={value!r} differs from the same core layer's first pass ({first!r}); a "
                    f"shared core layer has one type in every refinement pass"
                )

    # ----------------------------------------------------------------------------------------------------------------

    @property
    def rope_per_layer_type(self) -> bool:
        """Whether `rope_parameters` holds one dict per attention layer type (Gemma 3) rather than one for all."""
        return bool(set(self.rope_parameters or {}) & set(ATTENTION_LAYER_TYPES))

    def rope_parameters_of(self, layer_type: str) -> dict:
        """The RoPE parameters that layers of type `layer_type` use."""
        rope_parameters = self.rope_parameters or {}
        return rope_parameters[layer_type] if self.rope_per_layer_type else rope_parameters

    @property
    def rope_types(self) -> list[str]:
        return sorted({self.rope_parameters_of(t).get("rope_type", "default") for t in set(self.layer_types)})

    @property
    def max_trained_length(self) -> int | None:
        """Longest sequence the positional encoding supports, or `None` when every layer's RoPE extrapolates."""
        if all(rope_type in ROPE_TYPES_WITHOUT_LENGTH_LIMIT for rope_type in self.rope_types):
            return None
        return self.max_position_embeddings

    @property
    def has_refinement_memory(self) -> bool:
        return self.memory_injection != "none"

    @property
    def sampled_passes_max(self) -> int:
        """Upper bound of the passes drawn per training forward: `refinement_sampling_max`, or max_refinement_steps."""
        return self.max_refinement_steps if self.refinement_sampling_max is None else self.refinement_sampling_max

    @property
    def has_refinement_verifier(self) -> bool:
        """`refinement_verifier`, or, left unset, whether there is a memory (which reads the verifier's score)."""
        return self.has_refinement_memory if self.refinement_verifier is None else self.refinement_verifier

    def expert_capacity(self, num_tokens: int) -> int:
        return math.ceil(self.expert_capacity_factor * num_tokens * self.num_experts_per_tok / self.num_experts)


__all__ = ["ApexConfig", "ApexConfigError", "sliding_full_pattern", "unrolled_physical_layers"]
