"""`run_pretrain(config)`: pre-train an Apex model, or continue pre-training one, on HF Accelerate.

The same loop runs on one CPU, one GPU, or many through `accelerate launch --config_file recipes/accelerate/<x>.yaml`
(DDP, FSDP2, DeepSpeed ZeRO-2/3). Steps: tokenizer (loaded, or a byte-level BPE trained on the training documents)
-> model (a preset, or a checkpoint) -> chat template on the tokenizer (so every later stage starts from a complete
folder) -> packed rows from the source mixture (`apex_hf.pretrain.data`) -> AdamW with warmup + cosine or
warmup-stable-decay -> held-out loss before, every `eval_steps` and after -> `output_dir`. With
`resume_from_checkpoint`, the run first restores the newest complete checkpoint and goes on from its step.

`output_dir` holds the model and tokenizer (`save_pretrained`), `trainer_state.json` (`log_history` in the shape of
transformers' Trainer, so tools that read Trainer logs read it), `stage_summary.json` and a model card. The
`checkpoint-<step>` folders written every `save_steps` and on SIGTERM are training states to resume from
(`apex_hf.pretrain.checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler, get_wsd_schedule

from ..counting import count, peak_flops_per_device
from ..metrics import ApexTrainingStats, console_line
from ..modeling.modeling_apex import ApexSparseMoeBlock
from ..recipe import is_hub_repo_id
from ..stage_folder import write_summary, write_trainer_state
from ..tokenizer import EOS_TOKEN, prepare_chat_tokenizer, train_bpe_tokenizer
from .checkpoint import StopRequest, TrainingStopped, find_checkpoints, load_checkpoint, save_checkpoint
from .config import PretrainConfig, load_pretrain_config
from .data import PackedBatches, load_documents, make_batch, pack_rows, token_lists, tokenize_documents


def pretrain(config_path: str | Path, overrides: list[str] | None = None) -> Path:
    """`apex-hf pretrain --config FILE [--key value ...]`: read and check the recipe, then run it."""
    return run_pretrain(load_pretrain_config(config_path, overrides))


# --------------------------------------------------------------------------------------------------------------------
# tokenizer, model, optimizer


def load_tokenizer(config: PretrainConfig, sources: dict, accelerator: Accelerator, output_dir: Path):
    """The recipe's tokenizer, or a byte-level BPE trained on every training source. The main process trains it and
    saves it to `output_dir`, where the others load it: each process training its own could disagree on ties."""
    if config.tokenizer.train_vocab_size is None:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    if accelerator.is_main_process:
        column = config.data.text_column
        texts = (
            text for dataset in sources.values() for batch in dataset.iter(batch_size=1000) for text in batch[column]
        )
        train_bpe_tokenizer(texts, vocab_size=config.tokenizer.train_vocab_size).save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(output_dir)


def document_eos_id(tokenizer) -> int:
    """The token that ends each document: `<|endoftext|>` where the vocabulary has it (Apex's BPE, GPT-2, Qwen),
    because once a chat template is set, eos is the end of a turn (`<|im_end|>`), and a checkpoint's saved tokenizer
    has one; else the eos."""
    vocab = tokenizer.get_vocab()
    token_id = vocab[EOS_TOKEN] if EOS_TOKEN in vocab else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end documents with")
    return token_id


def build_model(config: PretrainConfig, tokenizer):
    """A new model from the preset, sized to the tokenizer, or the checkpoint; then the tokenizer's chat template
    (which may add the ChatML turn tokens and resize the embeddings)."""
    kwargs = config.model.loading_kwargs()
    if config.model.preset is not None:
        model_config = config.model_config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, config=config.model_config(), **kwargs)
    prepare_chat_tokenizer(tokenizer, model)
    document_eos = document_eos_id(tokenizer)
    if tokenizer.eos_token_id != document_eos:
        # eos is now the end of a turn, but a pre-trained model ends its text with the document eos: stop at either
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, document_eos]
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, experts, and the embedding, which with tied weights is also the output
    layer, as in nanoGPT and Llama), none on norm gains and biases: they set scales, which decay would only shrink."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig):
    if config.lr_scheduler_type == "wsd":
        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_decay_steps=config.num_decay_steps,
            num_training_steps=config.max_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio},
    )


def configure_deepspeed(accelerator: Accelerator, model: torch.nn.Module, config: PretrainConfig) -> None:
    """DeepSpeed takes the micro-batch and clipping from its own config (there is no DataLoader to read them from).
    Under ZeRO-3 the MoE block is a leaf: its parameters are gathered together when the block starts, because which
    experts run depends on the routing, so ranks would otherwise wait on different parameter gathers and hang."""
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    if plugin.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [ApexSparseMoeBlock])


# --------------------------------------------------------------------------------------------------------------------
# held-out loss


def held_out_rows(documents, config: PretrainConfig, accelerator: Accelerator):
    """This process's share of the held-out rows: the same number on every process, so that sharded models (FSDP,
    ZeRO-3), whose forward is collective, run the same number of batches everywhere."""
    world = accelerator.num_processes
    limit = None
    if config.max_eval_batches is not None:
        limit = config.max_eval_batches * config.per_device_train_batch_size * world
    input_ids, starts = pack_rows(token_lists(documents), config.seq_len, limit)
    usable = len(input_ids) - len(input_ids) % world
    if usable == 0:
        raise ValueError(f"the held-out set packs into {len(input_ids)} rows of {config.seq_len} tokens; need {world}")
    rank = accelerator.process_index
    return input_ids[rank:usable:world], starts[rank:usable:world]


@torch.no_grad()
def evaluate(model, rows, batch_size: int, accelerator: Accelerator) -> float:
    """Mean next-token cross-entropy over every held-out target, all processes together. Computed from the logits:
    the model's own loss would add the router balance and MTP losses."""
    input_ids, starts = rows
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(input_ids), batch_size):
        batch = make_batch(input_ids[start : start + batch_size], starts[start : start + batch_size])
        batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
        sums += torch.stack([loss.double(), (targets != -100).sum().double()])
    model.train()
    total, tokens = accelerator.reduce(sums, "sum").tolist()
    return total / tokens


# --------------------------------------------------------------------------------------------------------------------
# logging and saving


class TrainingLog:
    """`log_history` entries as transformers' Trainer writes them (`{"step", "loss", "learning_rate", ...}`,
    `{"step", "eval_loss"}`), sent whole to Accelerate's trackers; the main process prints a short line of each
    (`console_line`: the per-layer statistics would make it a thousand characters) and the progress bar shows loss,
    tokens/s, MFU and (tqdm's own) the time left."""

    def __init__(self, accelerator: Accelerator, progress: tqdm, history: list[dict[str, Any]]):
        self.accelerator, self.progress = accelerator, progress
        self.history = history

    def add(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])
        if not self.accelerator.is_main_process:
            return
        if "loss" in entry:
            postfix = {"loss": f"{entry['loss']:.3f}", "tokens_s": f"{entry['train_tokens_per_second']:,.0f}"}
            if "mfu" in entry:
                postfix["mfu"] = f"{entry['mfu']:.1f}%"
            self.progress.set_postfix(postfix)
        self.progress.write(f"[pretrain] step {entry['step']}: {console_line(entry)}")

    def state(self, config: PretrainConfig, step: int, train_runtime: float) -> dict[str, Any]:
        return {
            "global_step": step,
            "max_steps": config.max_steps,
            "logging_steps": config.logging_steps,
            "eval_steps": config.eval_steps,
            "save_steps": config.save_steps,
            "train_batch_size": config.per_device_train_batch_size,
            "train_runtime": train_runtime,
            "log_history": self.history,
        }


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


class LogWindow:
    """The training loss and time since the previous log line. Evaluation and checkpoints run inside `paused()`, so
    tokens/s and MFU count training time only."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.paused_seconds, self._pause_start = 0, 0.0, None
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - self._pause_start
            self._pause_start = None

    def training_seconds(self) -> float:
        return (self._pause_start or time.perf_counter()) - self.start - self.paused_seconds


def save(accelerator: Accelerator, model, tokenizer, directory: Path, state: dict[str, Any]) -> None:
    """Model, tokenizer and trainer state, written by the main process from the full (gathered) weights."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3: every process calls it
    if accelerator.is_main_process:
        # Regionally compiled layers are `OptimizedModule`s whose weights sit under `_orig_mod.`
        state_dict = {name.replace("_orig_mod.", ""): tensor for name, tensor in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)
        write_trainer_state(directory, state)
    accelerator.wait_for_everyone()


def write_model_card(config: PretrainConfig, summary: dict[str, Any], directory: Path) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    hub_datasets = sorted(
        {d.path for d in [*config.data.datasets, *config.data.eval_datasets] if is_hub_repo_id(d.path)}
    )
    data = ModelCardData(library_name="transformers", tags=["apex", "pretraining"], datasets=hub_datasets or None)
    origin = f"the `{config.model.preset}` preset" if config.model.preset else f"`{config.model.name_or_path}`"
    lines = [
        f"# {directory.name}",
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
        f'model = AutoModelForCausalLM.from_pretrained("{directory.name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{directory.name}")',
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


# --------------------------------------------------------------------------------------------------------------------
# the run


def run_pretrain(config: PretrainConfig) -> Path:
    """Train as `config` says and return `output_dir` (see the module docstring for what it holds). Raises
    `TrainingStopped` after saving a checkpoint when a SIGTERM arrives."""
    run_start = time.perf_counter()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to or None,
        project_dir=str(output_dir),
        dynamo_plugin=(
            TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if config.torch_compile else None
        ),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # e.g. torchrun on a machine without GPUs: Accelerate then runs every process alone, and they would all write
        # the same folders
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE), but Accelerate runs {accelerator.num_processes}; "
            f"without GPUs, set ACCELERATE_USE_CPU=1 for a multi-process CPU run"
        )
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        # The environment (an Accelerate/DeepSpeed config) overrides the argument, and the loop counts on the recipe's
        raise ValueError(
            f"the Accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; "
            f"set it only in the recipe (gradient_accumulation_steps={config.gradient_accumulation_steps})"
        )

    def say(message: str) -> None:
        accelerator.print(f"[pretrain] {message}")

    resumable = []
    if config.resume_from_checkpoint:
        resumable = find_checkpoints(output_dir, config.resume_from_checkpoint, accelerator.num_processes, say)
        if not resumable:
            say(f"no complete checkpoint in {output_dir}: starting at step 0")
    set_seed(config.seed)

    with accelerator.main_process_first():  # the main process fills datasets' cache; the others then read it
        sources, held_out_documents = load_documents(config.data, config.seed)
    if resumable:  # the run's own tokenizer (a trained BPE is not retrained)
        tokenizer = AutoTokenizer.from_pretrained(resumable[0])
    else:
        tokenizer = load_tokenizer(config, sources, accelerator, output_dir)
    model = build_model(config, tokenizer)
    document_eos = document_eos_id(tokenizer)
    with accelerator.main_process_first():
        train_tokens = {
            name: tokenize_documents(documents, tokenizer, config.data.text_column, document_eos, config.num_workers)
            for name, documents in sources.items()
        }
        train_batches = PackedBatches(
            train_tokens,
            config.seq_len,
            config.per_device_train_batch_size,
            config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            mixture=config.data.mixture_weights if config.data.is_weighted else None,
            accumulation=config.gradient_accumulation_steps,
        )
        held_out = None
        if held_out_documents is not None:
            held_out_tokens = tokenize_documents(
                held_out_documents, tokenizer, config.data.text_column, document_eos, config.num_workers
            )
            held_out = held_out_rows(held_out_tokens, config, accelerator)

    model_config = model.config
    # ZeRO-3 may partition the weights as they are built: `ds_numel` is a partitioned parameter's full size
    num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    counts = count(model_config, seq_len=config.seq_len)
    peak_flops = config.peak_tflops * 1e12 if config.peak_tflops else peak_flops_per_device(accelerator.device)
    # The config's output_router_logits is an inference default; in training the balance loss applies whenever its
    # coefficient is set.
    use_router_logits = model_config.num_experts > 0 and model_config.router_aux_loss_coef > 0
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
    )
    if config.activation_checkpointing:
        # transformers 5.23 renamed it (the old name is a deprecated alias); 5.17 has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    # On the prepared optimizer, whose param_groups DeepSpeed ZeRO-3 has regrouped; stepped once per optimizer step
    # here, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = build_scheduler(optimizer, config)
    accelerator.register_for_checkpointing(scheduler)
    stats = ApexTrainingStats(model)
    sync_expert_load = ExpertLoadSync(model, accelerator)

    start_step, history, train_seconds = 0, [], 0.0
    if resumable:
        loaded = load_checkpoint(accelerator, resumable, say)
        if loaded is None:  # a failed load may have overwritten part of the model: starting over would be wrong
            raise RuntimeError(f"none of the checkpoints in {output_dir} could be loaded (see the messages above)")
        folder, trainer_state, data_state = loaded
        start_step, history = trainer_state["global_step"], trainer_state["log_history"]
        train_seconds = trainer_state["train_runtime"]
        train_batches.load_state_dict(data_state)
        say(f"resumed from {folder} at step {start_step}")

    progress = tqdm(
        total=config.max_steps, initial=start_step, desc="pretrain", disable=not accelerator.is_local_main_process
    )
    log = TrainingLog(accelerator, progress, history)
    if config.report_to:
        accelerator.init_trackers(output_dir.name, config=_hparams(dataclasses.asdict(config)))
    tokens_per_step = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    ) * config.seq_len

    def mfu(tokens_per_second: float) -> float:
        """Model FLOPs utilisation in % (torchtitan's convention, `apex_hf.counting`), against every device's peak."""
        return 100 * tokens_per_second * counts.train_flops_per_token / (peak_flops * accelerator.num_processes)

    window = LogWindow(accelerator.device)

    def run_eval(step: int) -> None:
        loss = evaluate(model, held_out, config.per_device_train_batch_size, accelerator)
        log.add({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))})

    def checkpoint(step: int) -> Path:
        state = log.state(config, step, train_seconds + window.training_seconds())
        started = time.perf_counter()
        folder = save_checkpoint(
            accelerator, output_dir, step, train_batches.state_dict(), state, tokenizer, config.save_total_limit
        )
        say(f"saved {folder} in {time.perf_counter() - started:.1f}s")
        return folder

    def train_entry(step: int, learning_rate: float, grad_norm) -> dict[str, Any]:
        """The log line of the steps since the previous one: loss, rates, Apex statistics, all processes averaged."""
        nonlocal train_seconds
        mean_loss = accelerator.reduce(window.loss, "mean").item() / window.steps  # also waits for the device
        seconds = window.training_seconds()
        train_seconds += seconds
        entry = {"step": step, "loss": mean_loss, "learning_rate": learning_rate}
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        entry["train_tokens_per_second"] = window.steps * tokens_per_step / max(seconds, 1e-9)
        if peak_flops:
            entry["mfu"] = mfu(entry["train_tokens_per_second"])
        entry["num_input_tokens_seen"] = step * tokens_per_step
        if config.data.is_weighted:
            weights = config.data.mixture_weights(step - 1)
            entry.update({f"data/weight/{name}": w for name, w in zip(config.data.sources, weights)})
        apex = stats.pop()
        apex.pop("train_tokens_per_second", None)  # per process and counting eval time: replaced above
        if apex:
            names = sorted(apex)
            means = accelerator.reduce(torch.tensor([apex[n] for n in names], device=accelerator.device), "mean")
            entry.update(zip(names, means.tolist()))
        window.reset()
        return entry

    if held_out is not None and start_step == 0:
        run_eval(0)
    model.train()
    window.reset()
    with StopRequest(accelerator) as stop:  # from here on, a SIGTERM ends in a checkpoint rather than in lost steps
        for step in range(start_step + 1, config.max_steps + 1):
            for _ in range(config.gradient_accumulation_steps):
                batch = {name: tensor.to(accelerator.device) for name, tensor in next(train_batches).items()}
                sync_expert_load()
                with accelerator.accumulate(model):
                    loss = model(**batch, use_cache=False, output_router_logits=use_router_logits).loss
                    accelerator.backward(loss)
                window.loss += loss.detach() / config.gradient_accumulation_steps
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update()
            window.steps += 1
            if step % config.logging_steps == 0 or step == config.max_steps:
                log.add(train_entry(step, learning_rate, grad_norm))

            with window.paused():
                if held_out is not None and (
                    step == config.max_steps or (config.eval_steps and step % config.eval_steps == 0)
                ):
                    run_eval(step)
                saved = None
                if config.save_steps and step % config.save_steps == 0 and step < config.max_steps:
                    saved = checkpoint(step)
                if stop.agreed():
                    saved = saved or checkpoint(step)
                    progress.close()
                    accelerator.end_training()
                    raise TrainingStopped(step, saved)
    progress.close()

    save(accelerator, model, tokenizer, output_dir, log.state(config, config.max_steps, train_seconds))
    tokens_seen = config.max_steps * tokens_per_step
    eval_losses = [entry["eval_loss"] for entry in log.history if "eval_loss" in entry]
    summary = {
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        "num_input_tokens_seen": tokens_seen,
        "train_runtime": train_seconds,
        "train_tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "mfu": mfu(tokens_seen / max(train_seconds, 1e-9)) if peak_flops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "wall_seconds": time.perf_counter() - run_start,
        "resumed_from_step": start_step or None,
        "num_parameters": num_parameters,
        "num_active_parameters": counts.active,
        "train_flops_per_token": counts.train_flops_per_token,
        "num_processes": accelerator.num_processes,
        "config": dataclasses.asdict(config),
    }
    if accelerator.is_main_process:
        write_summary(output_dir, summary)
        write_model_card(config, summary, output_dir)
        mfu_text = f", MFU {summary['mfu']:.1f}%" if peak_flops else ""
        say(
            f"done in {summary['wall_seconds']:.0f}s: {tokens_seen:,} tokens at "
            f"{summary['train_tokens_per_second']:,.0f} tokens/s{mfu_text}; saved to {output_dir}"
        )
    accelerator.end_training()
    return output_dir
