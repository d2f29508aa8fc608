"""`run_pretrain(config)`: pre-train an Apex model, or continue pre-training one, on HF Accelerate.

The same loop runs on one CPU, one GPU, or many through `accelerate launch --config_file recipes/accelerate/<x>.yaml`
(DDP, FSDP2, DeepSpeed ZeRO-2/3). Steps: tokenizer (loaded, or a byte-level BPE trained on the training documents)
-> model (a preset, or a checkpoint) -> chat template on the tokenizer (so every later stage starts from a complete
folder) -> packed rows from the source mixture (`apex_hf.pretrain.data`) -> AdamW with warmup + cosine or
warmup-stable-decay -> held-out loss before, every `eval_steps` and after -> `output_dir`. With
`resume_from_checkpoint`, the run first restores the newest complete checkpoint and goes on from its step.

A run has torchtitan's trainer's shape: `PretrainRun.build` sets it up from the parts in `apex_hf.pretrain.build`,
`train` is the step loop (`step` is one optimizer step; held-out loss, checkpoints and a SIGTERM are handled between
steps), and `finish` writes the stage folder. What it logs is in one `TrainingLog` (`apex_hf.pretrain.log`).

`output_dir` is a stage folder (`apex_hf.stage_folder`): the model and tokenizer (`save_pretrained`),
`trainer_state.json`, `stage_summary.json`, a model card and the manifest. The `checkpoint-<step>` folders written
every `save_steps` and on SIGTERM are training states to resume from (`apex_hf.pretrain.checkpoint`). What the run
does with an `output_dir` that already holds something is `apex_hf.outputs.check_output_dir`'s rule, checked before
anything is loaded; the finished files are staged next to it and moved in at the end (`apex_hf.outputs.RunFolder`),
so a failure leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from ..counting import ApexCount, count, peak_flops_per_device
from ..outputs import RunFolder
from ..recipe import is_hub_repo_id
from ..stage_folder import NothingToResume, check_model_folder, write_summary, write_trainer_state
from .build import (
    build_batches,
    build_device,
    build_model,
    build_tokenizer,
    compiles,
    make_accelerator,
    prepare_training,
)
from .checkpoint import (
    CheckpointPublisher,
    StopRequest,
    TrainingStopped,
    check_staging_room,
    find_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from .config import PretrainConfig, load_pretrain_config
from .data import PackedBatches, load_documents, make_batch
from .log import TrainingLog


def pretrain(config_path: str | Path, overrides: list[str] | None = None, overwrite: bool = False) -> Path:
    """`apex-hf pretrain --config FILE [--key value ...]`: read and check the recipe, then run it."""
    return run_pretrain(load_pretrain_config(config_path, overrides), overwrite=overwrite)


def run_pretrain(config: PretrainConfig, overwrite: bool = False) -> Path:
    """Train as `config` says and return `output_dir` (see the module docstring for what it holds); an `output_dir`
    that holds a run is continued with `resume_from_checkpoint` or replaced with `overwrite`, else refused. Raises
    `TrainingStopped` after saving a checkpoint when a SIGTERM arrives."""
    folder = RunFolder.open(config.output_dir, resume=resumes_in_place(config), overwrite=overwrite)
    if config.model.name_or_path:
        check_model_folder(config.model.name_or_path)
    run = None
    try:
        run = PretrainRun.build(config, folder)
        run.train()
        return run.finish()
    except TrainingStopped as stopped:
        folder.discard()
        if folder.work != folder.final:
            raise TrainingStopped(stopped.step, stopped.checkpoint, resumable=False) from None
        raise
    except BaseException:
        try:
            if run is not None:
                run.publisher.wait()  # a checkpoint in flight is finished (or its error chained to this one) first
        finally:
            folder.discard()
        raise


def resumes_in_place(config: PretrainConfig) -> bool:
    """Whether the run continues a run of its own `output_dir` (`latest`, or a checkpoint folder inside it)."""
    requested = config.resume_from_checkpoint
    return requested == "latest" or (requested is not None and Path(requested).parent == Path(config.output_dir))


# The phases `PretrainRun.build` times before the first step, in order (`wall_seconds_by_phase` in the summary)
SETUP_PHASES = ("data", "tokenizer", "model", "batches", "prepare")


@dataclass
class PretrainRun:
    """One pre-training run: what it trains, on what, and where it stands. Its `config.output_dir` is the run's
    work folder (`RunFolder.work`: the output folder, or with `--overwrite` a hidden one next to it)."""

    config: PretrainConfig
    folder: RunFolder
    accelerator: Accelerator
    tokenizer: Any
    model: torch.nn.Module  # prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_batches: PackedBatches
    held_out: tuple | None  # this process's held-out rows, or None without a held-out set
    counts: ApexCount
    num_parameters: int
    start_step: int  # the step a resumed run restored, else 0
    log: TrainingLog
    started: float  # time.perf_counter() when the run began
    # wall-clock seconds outside the training steps, by phase: setup (`build`), evaluation, checkpoints, final save
    phase_seconds: dict[str, float]
    output_dir: Path = field(init=False)
    expert_load_sync: ExpertLoadSync = field(init=False)
    use_router_logits: bool = field(init=False)
    # checkpoints are hashed, flushed and renamed into place in the background (see `checkpoint.py`)
    publisher: CheckpointPublisher = field(init=False, default_factory=CheckpointPublisher)
    # wall-clock seconds of `train`: from the first evaluation to the last step's, warm-up and checkpoints included
    loop_seconds: float = field(init=False, default=0.0)

    def __post_init__(self):
        self.output_dir = Path(self.config.output_dir)
        self.expert_load_sync = ExpertLoadSync(self.model, self.accelerator)
        # The config's output_router_logits is an inference default; in training the balance loss applies whenever
        # its coefficient is set.
        model_config = self.accelerator.unwrap_model(self.model).config
        self.use_router_logits = model_config.num_experts > 0 and model_config.router_aux_loss_coef > 0

    @classmethod
    def build(cls, config: PretrainConfig, folder: RunFolder) -> PretrainRun:
        """Set up: the processes, the data, the tokenizer (a resumed run's own), the model and its optimizer, then the
        state of the checkpoint a resumed run continues from."""
        started, phases = time.perf_counter(), {}
        config = copy.copy(config)  # the caller's config keeps its output_dir and torch_compile
        config.output_dir = str(folder.work)
        config.torch_compile = compiles(config)  # "auto" decided: the summary and the log say what ran
        accelerator = make_accelerator(config)
        say = functools.partial(announce, accelerator)
        resumable = find_resumable(config, accelerator, say)
        set_seed(config.seed)
        with timed(phases, "data"), accelerator.main_process_first():  # the main process fills datasets' cache
            sources, held_out_documents = load_documents(config.data, config.seed)
        with timed(phases, "tokenizer"):
            if resumable:  # the run's own tokenizer (a trained BPE is not retrained)
                tokenizer = AutoTokenizer.from_pretrained(resumable[0])
            else:
                tokenizer = build_tokenizer(config, sources, accelerator)
        with timed(phases, "model"):
            model = build_model(config, tokenizer, build_device(accelerator))
        with timed(phases, "batches"):
            train_batches, held_out = build_batches(config, accelerator, tokenizer, sources, held_out_documents)
        # ZeRO-3 may partition the weights as they are built: `ds_numel` is a partitioned parameter's full size
        num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        if config.checkpoint_staging_dir:  # weights and AdamW's two moments, each the weights' size
            weight_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
            check_staging_room(Path(config.checkpoint_staging_dir), 3 * weight_bytes, accelerator)
        counts = count(model.config, seq_len=config.seq_len)
        with timed(phases, "prepare"):
            model, optimizer, scheduler = prepare_training(accelerator, model, config)
            start_step, history, train_seconds = restore(config, accelerator, resumable, train_batches, say)
        peak_flops = config.peak_tflops * 1e12 if config.peak_tflops else peak_flops_per_device(accelerator.device)
        log = TrainingLog(config, accelerator, model, counts, peak_flops, start_step, history, train_seconds)
        if config.report_to:
            accelerator.init_trackers(Path(config.output_dir).name, config=_hparams(dataclasses.asdict(config)))
        return cls(
            config=config,
            folder=folder,
            accelerator=accelerator,
            tokenizer=tokenizer,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_batches=train_batches,
            held_out=held_out,
            counts=counts,
            num_parameters=num_parameters,
            start_step=start_step,
            log=log,
            started=started,
            phase_seconds=phases,
        )

    def say(self, message: str) -> None:
        announce(self.accelerator, message)

    def train(self) -> None:
        """The step loop, from the first step not taken yet to `max_steps`. From its start, a SIGTERM ends in a
        checkpoint rather than in lost steps."""
        started = time.perf_counter()
        if self.held_out is not None and self.start_step == 0:
            self.evaluate(0)
        self.model.train()
        self.log.reset_window()
        with StopRequest(self.accelerator) as stop:
            for step in range(self.start_step + 1, self.config.max_steps + 1):
                learning_rate, grad_norm = self.step()
                self.log.step_done(step, learning_rate, grad_norm)
                with self.log.paused():
                    self.between_steps(step, stop)
        self.log.close()
        self.loop_seconds = time.perf_counter() - started

    def step(self) -> tuple[float, Any]:
        """One optimizer step over `gradient_accumulation_steps` batches: the learning rate it used and the gradient
        norm before clipping."""
        config, accelerator, model = self.config, self.accelerator, self.model
        for _ in range(config.gradient_accumulation_steps):
            batch = {name: tensor.to(accelerator.device) for name, tensor in next(self.train_batches).items()}
            self.expert_load_sync()
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False, output_router_logits=self.use_router_logits).loss
                accelerator.backward(loss)
            self.log.add_loss(loss.detach() / config.gradient_accumulation_steps)
        learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step uses
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return learning_rate, grad_norm

    def between_steps(self, step: int, stop: StopRequest) -> None:
        """Held-out loss every `eval_steps` and at the end, a checkpoint every `save_steps`, and on SIGTERM a
        checkpoint and `TrainingStopped`."""
        config = self.config
        if self.held_out is not None and (
            step == config.max_steps or (config.eval_steps and step % config.eval_steps == 0)
        ):
            self.evaluate(step)
        saved = None
        if config.save_steps and step % config.save_steps == 0 and step < config.max_steps:
            saved = self.checkpoint(step)
        if stop.agreed():
            saved = saved or self.checkpoint(step)
            self.wait_for_checkpoint()
            self.log.close()
            self.accelerator.end_training()
            raise TrainingStopped(step, saved)

    def evaluate(self, step: int) -> None:
        batch_size = self.config.per_device_train_batch_size
        with timed(self.phase_seconds, "evaluation"):
            loss = evaluate(self.model, self.held_out, batch_size, self.accelerator, self.use_router_logits)
        self.log.add({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))})

    def checkpoint(self, step: int) -> Path:
        with timed(self.phase_seconds, "checkpoints") as elapsed:
            folder = save_checkpoint(
                self.accelerator,
                self.output_dir,
                step,
                self.train_batches.state_dict(),
                self.log.trainer_state(step),
                self.tokenizer,
                self.config.save_total_limit,
                self.publisher,
                Path(self.config.checkpoint_staging_dir) if self.config.checkpoint_staging_dir else None,
            )
        self.say(f"saved the state of {folder} in {elapsed():.1f}s (published once hashed and flushed to disk)")
        return folder

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint in flight, if any, is published (its error raised here)."""
        if self.publisher.busy:
            with timed(self.phase_seconds, "checkpoints"):
                self.publisher.wait()

    def finish(self) -> Path:
        """The stage folder: model, tokenizer, log history, model card and summary, staged and then published with
        the manifest (`RunFolder.publish`). Returns it."""
        config, accelerator, final = self.config, self.accelerator, self.folder.final
        self.wait_for_checkpoint()
        if accelerator.is_main_process:
            self.folder.new_staging()
        accelerator.wait_for_everyone()
        with timed(self.phase_seconds, "final_save"):
            save(
                accelerator, self.model, self.tokenizer, self.folder.staging, self.log.trainer_state(config.max_steps)
            )
        summary = self.summary()
        if accelerator.is_main_process:
            write_model_card(config, summary, self.folder.staging, final.name)
            write_summary(self.folder.staging, summary)
            self.folder.publish()
            mfu_text = f", MFU {summary['mfu']:.1f}%" if summary["mfu"] is not None else ""
            if summary["graphs_compiled_after_warmup"]:
                self.say(
                    f"torch.compile built {summary['graphs_compiled_after_warmup']} graphs after the first log "
                    "window; each recompilation stalls training (TORCH_LOGS=recompiles names the failed guard)"
                )
            self.say(
                f"done in {summary['wall_seconds']:.0f}s: {summary['num_input_tokens_seen']:,} tokens at "
                f"{summary['train_tokens_per_second']:,.0f} tokens/s{mfu_text}; saved to {final}"
            )
        accelerator.end_training()
        return final

    def summary(self) -> dict[str, Any]:
        config, log = self.config, self.log
        tokens_seen = config.max_steps * log.tokens_per_step
        tokens_per_second = tokens_seen / max(log.train_seconds, 1e-9)
        steady_tokens_per_second, warmup_seconds = log.steady_state()
        wall_seconds = time.perf_counter() - self.started
        tokens_this_process = (config.max_steps - self.start_step) * log.tokens_per_step  # a resumed run: its own
        eval_losses = log.eval_losses()
        return {
            "eval_loss_before": eval_losses[0] if eval_losses else None,
            "eval_loss_after": eval_losses[-1] if eval_losses else None,
            "num_input_tokens_seen": tokens_seen,
            "train_runtime": log.train_seconds,
            "train_tokens_per_second": tokens_per_second,
            "mfu": log.mfu(tokens_per_second),
            # after the first log window (its seconds: `warmup_seconds`); over the loop, from the first evaluation to
            # the last step (warm-up, evaluations and checkpoints included); and over this process's wall-clock time
            # (setup and final save too)
            "steady_tokens_per_second": steady_tokens_per_second,
            "steady_mfu": log.mfu(steady_tokens_per_second) if steady_tokens_per_second else None,
            "warmup_seconds": warmup_seconds,
            "graphs_compiled_after_warmup": log.graphs_compiled_after_warmup(),
            "loop_tokens_per_second": tokens_this_process / max(self.loop_seconds, 1e-9),
            "whole_run_tokens_per_second": tokens_this_process / wall_seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "wall_seconds": wall_seconds,
            # where the wall clock went: the training steps (warm-up included; a resumed run's earlier steps too) and
            # each phase of this process outside them
            "wall_seconds_by_phase": {"training_steps": log.train_seconds, **self.phase_seconds},
            # hashing, flushing and renaming checkpoints in the background, beside the steps (not in the phases)
            "checkpoint_publishing_seconds": self.publisher.seconds,
            "resumed_from_step": self.start_step or None,
            "num_parameters": self.num_parameters,
            "num_active_parameters": self.counts.active,
            "train_flops_per_token": self.counts.train_flops_per_token,
            "num_processes": self.accelerator.num_processes,
            "config": {**dataclasses.asdict(config), "output_dir": str(self.folder.final)},
        }


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str):
    """Adds the block's wall-clock seconds to `phases[name]`; yields a function that gives the block's own seconds."""
    started = time.perf_counter()
    yield lambda: time.perf_counter() - started
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


def announce(accelerator: Accelerator, message: str) -> None:
    accelerator.print(f"[pretrain] {message}")


def find_resumable(config: PretrainConfig, accelerator: Accelerator, say: Callable[[str], None]) -> list[Path]:
    """The checkpoints a resumed run may continue from, best first (none for a fresh run)."""
    if not config.resume_from_checkpoint:
        return []
    output_dir = Path(config.output_dir)
    return find_checkpoints(output_dir, config.resume_from_checkpoint, accelerator.num_processes, say)


def restore(
    config: PretrainConfig,
    accelerator: Accelerator,
    resumable: list[Path],
    train_batches: PackedBatches,
    say: Callable[[str], None],
) -> tuple[int, list[dict[str, Any]], float]:
    """Restore the first loadable checkpoint into the prepared model, optimizer, scheduler and data position; returns
    its step, log history and training time (`0, [], 0.0` for a fresh run)."""
    if not resumable:
        return 0, [], 0.0
    loaded = restore_checkpoint(accelerator, resumable, say)
    if loaded is None:  # a failed load may have overwritten part of the model: starting over would be wrong
        raise NothingToResume(
            f"--resume: none of the checkpoints in {Path(config.output_dir)} could be loaded (why: the messages above)"
        )
    folder, trainer_state, data_state = loaded
    train_batches.load_state_dict(data_state)
    say(f"resumed from {folder} at step {trainer_state['global_step']}")
    return trainer_state["global_step"], trainer_state["log_history"], trainer_state["train_runtime"]


@torch.no_grad()
def evaluate(model, rows, batch_size: int, accelerator: Accelerator, output_router_logits: bool = False) -> float:
    """Mean next-token cross-entropy over every held-out target, all processes together. Computed from the logits:
    the model's own loss would add the router balance and MTP losses. `output_router_logits` as in training: its
    first use installs transformers' capture hooks on the routers, and compiled layers guard on their hooks, so where
    evaluation compiles (flex_attention, see `evaluation_stance`), one without them before training would be
    recompiled at the next one."""
    input_ids, starts = rows
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with evaluation_stance(accelerator.unwrap_model(model).config):
        for start in range(0, len(input_ids), batch_size):
            batch = make_batch(input_ids[start : start + batch_size], starts[start : start + batch_size])
            batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            logits = model(**inputs, use_cache=False, output_router_logits=output_router_logits).logits
            targets = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            sums += torch.stack([loss.double(), (targets != -100).sum().double()])
    model.train()
    total, tokens = accelerator.reduce(sums, "sum").tolist()
    return total / tokens


def evaluation_stance(config) -> contextlib.AbstractContextManager:
    """Evaluation runs compiled layers eagerly: it is a few batches without gradients, and dynamo guards on grad
    mode, so in regionally compiled layers it compiled a second set of graphs, as many as training's own (the tiny
    recipe on a CPU: 19 graphs in 34 s, where training's took 15; bench-moe on an H200: 12.5 s of evaluation in a
    300-step run).
    Except under flex_attention, whose kernel exists only compiled: run eagerly, it would hold every head's whole
    score matrix."""
    if config._attn_implementation == "flex_attention":
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


class ExpertLoadSync:
    """Sums the routers' `expert_load` over the processes before each training forward, where the aux-loss-free
    balancing step reads it: every process then takes the same bias step, from the global batch's load, as a single
    process would. Without it, DDP would broadcast rank 0's buffers (balancing on a 1/N sample), and FSDP would let
    each process's biases, and so its routing, drift apart."""

    def __init__(self, model: torch.nn.Module, accelerator: Accelerator):
        self.loads = [m.expert_load for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        rate = getattr(accelerator.unwrap_model(model).config, "router_bias_update_rate", 0.0)
        self.active = accelerator.num_processes > 1 and bool(self.loads) and rate > 0

    def __call__(self) -> None:
        if not self.active:
            return
        flat = torch.cat(self.loads)
        torch.distributed.all_reduce(flat)
        for load, reduced in zip(self.loads, flat.split([load.numel() for load in self.loads])):
            load.copy_(reduced)


# The final weights in files of at most this size: the folder's manifest hashes its files in parallel, one core each
# (about 1.6 GB/s of SHA-256), so bench-moe's 10.5 GB in one file would take 6 s and in six shards about 1.
FINAL_SHARD_SIZE = "2GB"


def save(accelerator: Accelerator, model, tokenizer, directory: Path, state: dict[str, Any]) -> None:
    """Model, tokenizer and trainer state, written by the main process from the full (gathered) weights."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3: every process calls it
    if accelerator.is_main_process:
        # Regionally compiled layers are `OptimizedModule`s whose weights sit under `_orig_mod.`
        state_dict = {name.replace("_orig_mod.", ""): tensor for name, tensor in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(directory, state_dict=state_dict, max_shard_size=FINAL_SHARD_SIZE)
        tokenizer.save_pretrained(directory)
        write_trainer_state(directory, state)
    accelerator.wait_for_everyone()


def write_model_card(config: PretrainConfig, summary: dict[str, Any], directory: Path, name: str) -> None:
    """`README.md` in `directory` for the model folder called `name` (the card is written before the folder has its
    final name)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_datasets = sorted(
        {d.path for d in [*config.data.datasets, *config.data.eval_datasets] if is_hub_repo_id(d.path)}
    )
    data = ModelCardData(library_name="transformers", tags=["apex", "pretraining"], datasets=hub_datasets or None)
    origin = f"the `{config.model.preset}` preset" if config.model.preset else f"`{config.model.name_or_path}`"
    lines = [
        f"# {name}",
        "",
        f"An Apex causal language model (mixture of experts + iterative refinement) pre-trained from {origin} with "
        f"`apex-hf pretrain`: {config.max_steps} steps, {summary['num_input_tokens_seen']:,} tokens in rows of "
        f"{config.seq_len}, {summary['num_parameters']:,} parameters ({summary['num_active_parameters']:,} active "
        f"per token).",
    ]
    if summary["eval_loss_after"] is not None:
        lines.append(
            f"Held-out loss: {summary['eval_loss_before']:.4f} before training, "
            f"{summary['eval_loss_after']:.4f} after."
        )
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# trust_remote_code runs the Apex code saved with the weights (or `import apex_hf` where it is installed)",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
    ]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(directory / "README.md")


def _hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to scalars, the only values every tracker (TensorBoard's hparams) accepts."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
    return flat
