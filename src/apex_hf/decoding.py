"""Greedy decoding with the whole step on the device: plain, self-speculative for looped models, and speculative with
the model's multi-token prediction layers.

Why a decoding loop of its own: at batch 1 a decode step of a 2B-parameter MoE is a few hundred small kernels that the
GPU runs in about a millisecond, and `generate` adds about as much host work per token (a stopping check that syncs,
logits processors, dynamo guards, CUDA-graph-tree bookkeeping). transformers has no loop that keeps the sequence, its
length and the next input on the device, so none of that host work can be left out there. Here a step reads the last
token at a device-side length, runs the model on transformers' `StaticCache`, takes the argmax and writes it back at
that length. Compiled (inductor, without CUDA graphs of its own) and captured once as a CUDA graph, it replays with
one launch per token; the host reads nothing back until a stop check every `stop_check_every` tokens.

`SelfSpeculativeDecoder` drafts with fewer passes of the shared core (the same weights at K = 1: self-speculation as
in Huginn and LayerSkip) and verifies the drafts with the full K in one forward. A whole round, drafting, verifying,
accepting and rolling the caches back, is one CUDA graph with the accepted count kept on the device, so there is one
host read per round. Accepted tokens are the full model's own argmaxes, so the output is plain greedy decoding's.
`MultiTokenSpeculativeDecoder` drafts with the multi-token prediction depths instead, one token and one decoder layer
per depth rather than a shallower model per token, and verifies the drafts the same way.

All return what `model.generate(input_ids, do_sample=False, max_new_tokens=N)` returns: prompt and new tokens, rows
that ended padded after their end token. Prompts in one call have one length (no padding), and the model decodes at
a fixed number of passes (early exits are data-dependent control flow, which a CUDA graph cannot hold).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StaticCache


# Calls of a step before it is captured: the first compiles, the next ones show that nothing recompiles any more.
WARMUP_CALLS = 3


@dataclass
class SpeculationStats:
    """Of the last `generate` call."""

    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class GreedyDecoder:
    """Greedy decoding of `model` for `batch_size` prompts of one length and up to `max_length` tokens in all.

    `cuda_graph` (default: on a CUDA model) captures the step once it has been warmed up; `compile` (default: with the
    graph) compiles it first with `torch.compile`. Both keep to the decoder: the step, the caches and the graph are
    built for its batch size and length, and are reused by every `generate` call."""

    lookahead = 0  # tokens a step may write past the sequence's end (a speculative round writes its rejected drafts)

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_length: int,
        batch_size: int = 1,
        cuda_graph: bool | None = None,
        compile: bool | None = None,
        stop_check_every: int = 16,
    ):
        self.model = model
        self.device = model.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.compile = self.cuda_graph if compile is None else compile
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {self.device}")
        sizes = dict(max_length=max_length, batch_size=batch_size, stop_check_every=stop_check_every)
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        check_fixed_passes(model)
        self.max_length, self.batch_size, self.stop_check_every = max_length, batch_size, stop_check_every
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.capacity = max_length + self.lookahead
        self.cache = self._new_cache()
        self.tokens = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=self.device)
        self.length = torch.zeros((), dtype=torch.long, device=self.device)  # tokens of the sequence so far
        self._run = self._runner()

    def _runner(self) -> StepRunner:
        return StepRunner(self._step, self.compile, self.cuda_graph)

    def _new_cache(self) -> StaticCache:
        """transformers' static cache with every layer keeping every position. Its sliding-window layers keep the last
        `sliding_window` positions instead, in a ring that they track with a host-side count: a captured step would
        replay the count of the step it was captured at, and a speculative round's rejected drafts would overwrite
        entries that the next round reads. Kept whole, those layers cost the full length of cache, and the model's
        sliding-window mask still limits what each query reads to its window."""
        config = copy.copy(self.model.config)
        # A config without `layer_types` (Llama, Qwen3-MoE, Mistral) leaves them to transformers, which makes every
        # layer a windowed one where the config sets `sliding_window`: naming them here keeps those whole too.
        layers = len(config.layer_types) if getattr(config, "layer_types", None) else config.num_hidden_layers
        config.layer_types = ["full_attention"] * layers
        return StaticCache(config=config, max_cache_len=self.capacity)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
    ) -> torch.LongTensor:
        """`eos_token_id` and `pad_token_id` default to the model's generation config, as in `generate`; with
        `ignore_eos`, every row runs to `max_new_tokens` (for timing). `attention_mask` is taken as a tokenizer returns
        it, and must be all ones: prompts are not padded."""
        prompt_length = self._check_call(input_ids, max_new_tokens)
        if attention_mask is not None and (attention_mask.shape != input_ids.shape or not bool(attention_mask.all())):
            raise ValueError(
                "attention_mask masks some prompt tokens: this decoder takes prompts of one length, without padding "
                "(decode rows of different lengths apart, or use generate())"
            )
        eos_ids = None if ignore_eos else self._eos_ids(eos_token_id)
        self._prefill(input_ids)
        self._decode(prompt_length, max_new_tokens, eos_ids)
        return self._finish(prompt_length, max_new_tokens, eos_ids, pad_token_id)

    def _check_call(self, input_ids: torch.Tensor, max_new_tokens: int) -> int:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a (batch, length) tensor of token ids (torch.long)")
        batch, prompt_length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"input_ids has {batch} rows; this decoder was built for batch_size={self.batch_size}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device}; the model is on {self.device}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be a positive integer")
        if prompt_length < 1 or prompt_length + max_new_tokens > self.max_length:
            raise ValueError(
                f"a prompt of {prompt_length} tokens plus max_new_tokens={max_new_tokens} does not fit this decoder's "
                f"max_length={self.max_length}; build it with a larger max_length"
            )
        return prompt_length

    def _eos_ids(self, eos_token_id) -> torch.Tensor | None:
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id
        if eos_token_id is None:
            return None
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _forward(self, input_ids, positions, cache, logits_to_keep: int, **call) -> torch.Tensor:
        """Logits of the last `logits_to_keep` inputs, at device-side `positions` (1-D, shared by every row)."""
        positions = positions.view(1, -1).expand(input_ids.shape[0], -1)
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_keyword: cache},
            **call,
        )
        return output.logits

    def _prefill(self, input_ids: torch.Tensor) -> None:
        """The prompt through the model, uncompiled (prompts vary in length); its argmax is the first new token."""
        prompt_length = input_ids.shape[1]
        self.cache.reset()  # in place: a captured graph keeps pointing at the same memory
        self.tokens[:, :prompt_length] = input_ids
        positions = torch.arange(prompt_length, device=self.device)
        logits = self._forward(input_ids, positions, self.cache, 1)
        self.tokens[:, prompt_length] = logits[:, -1].argmax(-1)
        self.length.fill_(prompt_length + 1)

    def _step(self) -> None:
        """One token for every row, with no host read: input, position and output all at the device-side length."""
        position = (self.length - 1).view(1)
        logits = self._forward(self.tokens.index_select(1, position), position, self.cache, 1)
        self.tokens.index_copy_(1, self.length.view(1), logits[:, -1].argmax(-1, keepdim=True))
        self.length.add_(1)

    def _decode(self, prompt_length: int, max_new_tokens: int, eos_ids: torch.Tensor | None) -> None:
        steps, done = max_new_tokens - 1, 0  # the prefill gave the first token
        while done < steps:
            chunk = min(self.stop_check_every, steps - done)
            for _ in range(chunk):
                self._run()
            done += chunk
            if eos_ids is not None and self._every_row_ended(prompt_length, prompt_length + done + 1, eos_ids):
                return

    def _every_row_ended(self, prompt_length: int, length: int, eos_ids: torch.Tensor) -> bool:
        return bool(torch.isin(self.tokens[:, prompt_length:length], eos_ids).any(dim=1).all())

    def _finish(self, prompt_length: int, max_new_tokens: int, eos_ids, pad_token_id) -> torch.LongTensor:
        """As `generate` returns it: stopped when every row has ended, rows that ended earlier padded after their end
        token."""
        new_tokens = self.tokens[:, prompt_length : min(int(self.length), prompt_length + max_new_tokens)]
        if eos_ids is not None:
            is_end = torch.isin(new_tokens, eos_ids)
            last = torch.where(is_end.any(1), is_end.int().argmax(1), new_tokens.shape[1] - 1)
            new_tokens = new_tokens[:, : int(last.max()) + 1]
            after_end = torch.arange(new_tokens.shape[1], device=self.device) > last[:, None]
            if bool(after_end.any()):
                new_tokens = new_tokens.masked_fill(after_end, self._pad_id(pad_token_id, eos_ids))
        return torch.cat([self.tokens[:, :prompt_length], new_tokens], dim=1)

    def _pad_id(self, pad_token_id: int | None, eos_ids: torch.Tensor) -> int:
        if pad_token_id is None:
            pad_token_id = self.model.generation_config.pad_token_id
        return int(eos_ids[0]) if pad_token_id is None else pad_token_id


class SpeculativeDecoder(GreedyDecoder):
    """What the speculative decoders share: batch 1, rounds that each draft `draft_tokens` tokens and verify them,
    the accepted count kept on the device, one host read per round (the length, for the stop), `stats` of the last
    call. A subclass builds the round (`_runner`), the prefill, and sets `_accepted` to zero there."""

    draft_tokens = 1

    def __init__(self, model: torch.nn.Module, *, max_length: int, cuda_graph: bool | None, compile: bool | None):
        super().__init__(model, max_length=max_length, batch_size=1, cuda_graph=cuda_graph, compile=compile)
        self.draft_cache = self._new_cache()
        self._offsets = torch.arange(self.draft_tokens + 1, device=self.device)
        self._accepted = torch.zeros((), dtype=torch.long, device=self.device)
        self.stats = SpeculationStats(rounds=0, drafted=0, accepted=0)

    def _decode(self, prompt_length: int, max_new_tokens: int, eos_ids: torch.Tensor | None) -> None:
        rounds, target = 0, prompt_length + max_new_tokens
        while True:
            self._run()
            rounds += 1
            length = int(self.length)  # one host read per round: how far the accepted drafts got
            if length >= target or (eos_ids is not None and self._every_row_ended(prompt_length, length, eos_ids)):
                break
        drafted = rounds * self.draft_tokens
        self.stats = SpeculationStats(rounds=rounds, drafted=drafted, accepted=int(self._accepted))

    def _verifier_inputs(self, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the full model reads in a round: the sequence's last token and the drafts, and their positions."""
        last = (self.length - 1).view(1)
        return torch.cat([self.tokens.index_select(1, last), drafts], dim=1), last + self._offsets

    def _accept(self, greedy: torch.Tensor, drafts: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The full model's argmaxes after the last token and each draft are the output, up to the first draft they
        disagree with (inclusive: there its own token replaces the draft). The cache is rolled back to the accepted
        tokens, the length moves past them. Returns the number of accepted drafts."""
        accepted = (greedy[:, :-1] == drafts).long().cumprod(dim=1).sum()
        self.tokens.index_copy_(1, positions + 1, greedy)
        set_cache_length(self.cache, self.length + accepted)
        self._accepted.add_(accepted)
        self.length.add_(accepted + 1)
        return accepted


class SelfSpeculativeDecoder(SpeculativeDecoder):
    """Greedy decoding of a looped Apex model at batch 1 that drafts `draft_tokens` tokens per round with
    `draft_passes` passes of the shared core (fewer than the model's `num_refinement_steps`) and keeps the longest
    prefix its full-depth forward agrees with, plus that forward's next token.

    The draft has a cache of its own, since its coda reads another pass's output. Each round it first re-reads the
    last two tokens of the sequence: whatever was accepted, its cache is then complete up to the round's first draft,
    so every round has the same shapes."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_length: int,
        draft_passes: int = 1,
        draft_tokens: int = 4,
        cuda_graph: bool | None = None,
        compile: bool | None = None,
    ):
        check_self_speculation(model, draft_passes, draft_tokens)
        self.draft_passes, self.draft_tokens = draft_passes, draft_tokens
        self.lookahead = draft_tokens + 1
        super().__init__(model, max_length=max_length, cuda_graph=cuda_graph, compile=compile)

    def _runner(self) -> StepRunner:
        """The round's pieces are compiled apart: the draft's single-token step runs several times a round with the
        same shapes, compiled once; the round around them is captured whole."""
        if self.compile:
            self._draft_catch_up = torch.compile(self._draft_catch_up)
            self._draft_next = torch.compile(self._draft_next)
            self._verify = torch.compile(self._verify)
        return StepRunner(self._round, compile_step=False, cuda_graph=self.cuda_graph)

    def _prefill(self, input_ids: torch.Tensor) -> None:
        super()._prefill(input_ids)
        self.draft_cache.reset()
        positions = torch.arange(input_ids.shape[1], device=self.device)
        self._forward(input_ids, positions, self.draft_cache, 1, num_refinement_steps=self.draft_passes)
        self._accepted.zero_()

    def _draft_catch_up(self) -> torch.Tensor:
        """The draft re-reads the sequence's last two tokens (its cache holds all before them) and drafts one."""
        positions = self.length - 2 + self._offsets[:2]
        set_cache_length(self.draft_cache, self.length - 2)
        return self._draft(self.tokens.index_select(1, positions), positions)

    def _draft(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self._forward(input_ids, positions, self.draft_cache, 1, num_refinement_steps=self.draft_passes)
        return logits[:, -1].argmax(-1, keepdim=True)

    def _draft_next(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._draft(token, position.view(1))

    def _verify(self, drafts: torch.Tensor) -> None:
        """The full model on the last token and the drafts, its argmaxes accepted (`_accept`)."""
        inputs, positions = self._verifier_inputs(drafts)
        greedy = self._forward(inputs, positions, self.cache, self.draft_tokens + 1).argmax(-1)
        self._accept(greedy, drafts, positions)

    def _round(self) -> None:
        drafts = [self._draft_catch_up()]
        for offset in range(self.draft_tokens - 1):
            drafts.append(self._draft_next(drafts[-1], self.length + offset))
        self._verify(torch.cat(drafts, dim=1))


class MultiTokenSpeculativeDecoder(SpeculativeDecoder):
    """Greedy decoding at batch 1 of an Apex model with multi-token prediction layers, which drafts `draft_tokens`
    tokens a round (default: one per MTP depth, `num_mtp_layers`) with the MTP depths, as DeepSeek-V3 uses its MTP
    module: depth d reads depth d - 1's state at a token (the model's, for depth 1) and the embedding of the token d
    after it, through one decoder layer, and guesses the token after that.

    A round reads the last token of the sequence and the drafts through the model in one forward; its argmaxes are the
    output up to the first draft they disagree with (inclusive), as in self-speculation. Then each depth reads the
    model's (or the previous depth's) states at every position of the round, with a cache of its own rolled back to
    the accepted tokens, and its guess at the last accepted position becomes the next round's draft d, which depth
    d + 1 reads in turn. A round costs one forward of `draft_tokens + 1` tokens, which at batch 1 takes about as long
    as one of one, plus `draft_tokens` decoder layers, for 1 to `draft_tokens + 1` tokens; it is one CUDA graph."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_length: int,
        draft_tokens: int | None = None,
        cuda_graph: bool | None = None,
        compile: bool | None = None,
    ):
        self.draft_tokens = check_multi_token_speculation(model, draft_tokens)
        self.lookahead = self.draft_tokens + 1
        super().__init__(model, max_length=max_length, cuda_graph=cuda_graph, compile=compile)
        # depth 1 uses the draft cache that every speculative decoder has; the others are built alike
        self.depth_caches = [self.draft_cache] + [self._new_cache() for _ in range(self.draft_tokens - 1)]
        self._drafts = torch.zeros(1, self.draft_tokens, dtype=torch.long, device=self.device)

    def _runner(self) -> StepRunner:
        return StepRunner(self._round, self.compile, self.cuda_graph)

    def _hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model's last hidden states (the LM head's and the first MTP depth's input) at device-side positions."""
        output = self.model.model(
            input_ids=input_ids, position_ids=positions.view(1, -1), use_cache=True, **{self.cache_keyword: self.cache}
        )
        return output.last_hidden_state

    def _draft_chain(self, states: torch.Tensor, ahead: torch.Tensor, positions: torch.Tensor, last: torch.Tensor):
        """Every depth over `positions` (one per state), of which those up to index `last` are the sequence's. `ahead`
        holds the tokens from position `positions[0] + 1` on, known up to index `last`; depth d's guess at `last` is
        written after them (index `last + d`), where depth d + 1 reads it. The drafts are those guesses."""
        count = states.shape[1]
        for depth, cache in enumerate(self.depth_caches, start=1):
            ahead_ids = ahead[:, depth - 1 : depth - 1 + count]
            states, guesses = self.model.predict_ahead(depth, states, ahead_ids, positions.view(1, -1), cache)
            set_cache_length(cache, positions[0] + last + 1)
            ahead.index_copy_(1, (last + depth).view(1), guesses.index_select(1, last.view(1)))
        self._drafts.copy_(ahead.index_select(1, last + self._offsets[1:]))

    def _prefill(self, input_ids: torch.Tensor) -> None:
        """The prompt through the model, then through the depths with the prompt's later tokens (the first new token
        last): the drafts of the tokens after the first new one."""
        prompt_length = input_ids.shape[1]
        self.cache.reset()
        for cache in self.depth_caches:
            cache.reset()
        self.tokens[:, :prompt_length] = input_ids
        positions = torch.arange(prompt_length, device=self.device)
        hidden = self._hidden_states(input_ids, positions)
        self.tokens[:, prompt_length] = self.model.lm_head(hidden[:, -1]).argmax(-1)
        ahead = torch.cat([self.tokens[:, 1 : prompt_length + 1], self._drafts], dim=1)  # room for the drafts
        last = torch.tensor(prompt_length - 1, device=self.device)
        self._draft_chain(hidden, ahead, positions, last)
        self.length.fill_(prompt_length + 1)
        self._accepted.zero_()

    def _round(self) -> None:
        inputs, positions = self._verifier_inputs(self._drafts)
        hidden = self._hidden_states(inputs, positions)
        greedy = self.model.lm_head(hidden).argmax(-1)  # after the last token, and after each draft
        accepted = self._accept(greedy, self._drafts, positions)
        self._draft_chain(hidden, torch.cat([greedy, self._drafts], dim=1), positions, accepted)


class StepRunner:
    """Runs a step function: compiled or not; with `cuda_graph`, its first `WARMUP_CALLS` calls run on a side stream
    (as CUDA-graph capture requires), then it is captured once and every later call replays the graph. The warm-up
    calls are real steps."""

    def __init__(self, step: Callable[[], None], compile_step: bool, cuda_graph: bool):
        self.step = torch.compile(step) if compile_step else step
        self.cuda_graph = cuda_graph
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif not self.cuda_graph:
            self.step()
        elif self.calls < WARMUP_CALLS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.calls += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run
                self.step()
            self.graph.replay()


def set_cache_length(cache: StaticCache, length: torch.Tensor) -> None:
    """Roll a static cache back (or on) to `length` tokens, on the device. The entries past it stay in memory, masked
    by position, and are overwritten by the next tokens."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.copy_(length)


def check_fixed_passes(model: torch.nn.Module) -> None:
    threshold = getattr(model.config, "refinement_exit_threshold", None)
    if threshold is not None and threshold <= 1:
        raise ValueError(
            f"config.refinement_exit_threshold={threshold}: early exits decide per token on the host, which a "
            f"device-side decoding loop cannot do; set it to None (fixed passes) for this decoder, or use generate()"
        )


def check_self_speculation(model: torch.nn.Module, draft_passes: int, draft_tokens: int) -> None:
    config = model.config
    passes = getattr(config, "num_refinement_steps", None)
    if passes is None:
        raise ValueError(f"{type(model).__name__} has no refinement loop; self-speculation drafts with fewer passes")
    if not isinstance(draft_passes, int) or not 1 <= draft_passes < passes:
        raise ValueError(
            f"draft_passes={draft_passes!r} is invalid: the draft runs fewer passes than the model's "
            f"num_refinement_steps={passes}, so 1..{passes - 1}"
        )
    if not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens!r} is invalid: must be a positive integer")


def check_multi_token_speculation(model: torch.nn.Module, draft_tokens: int | None) -> int:
    """The number of drafts a round: `draft_tokens`, or one per MTP depth."""
    depths = getattr(model.config, "num_mtp_layers", 0)
    if depths < 1:
        raise ValueError(
            f"{type(model).__name__} has no multi-token prediction layers (num_mtp_layers=0) to draft with: train one "
            f"with num_mtp_layers >= 1, or draft with fewer passes (SelfSpeculativeDecoder)"
        )
    if draft_tokens is None:
        return depths
    if not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= depths:
        raise ValueError(
            f"draft_tokens={draft_tokens!r} is invalid: one draft per multi-token prediction depth, so 1..{depths} "
            f"(num_mtp_layers={depths})"
        )
    return draft_tokens
