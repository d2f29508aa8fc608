"""`run_pretrain(config)`: pre-train an Apex model, or continue pre-training one, on HF Accelerate.

The same loop runs on one CPU, one GPU, or many through `accelerate launch --config_file recipes/accelerate/<x>.yaml`
(DDP, FSDP2, DeepSpeed ZeRO-2/3). Steps: tokenizer (loaded, or a byte-level BPE trained on the training documents)
-> model (a preset, or a checkpoint) -> chat template on the tokenizer (so every later stage starts from a complete
folder) -> packed rows (`apex_hf.pretrain.data`) -> AdamW with warmup + cosine or warmup-stable-decay -> held-out loss
before, every `eval_steps` and after -> `output_dir`.

`output_dir` holds the model and tokenizer (`save_pretrained`), `trainer_state.json` (`log_history` in the shape of
transformers' Trainer, so tools that read Trainer logs read it), `stage_summary.json` and a model card. A
`checkpoint-<step>` folder is the same minus summary and card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler, get_wsd_schedule

from ..counting import count
from ..metrics import ApexTrainingStats
from ..modeling.modeling_apex import ApexSparseMoeBlock
from ..recipe import is_hub_repo_id
from ..tokenizer import EOS_TOKEN, prepare_chat_tokenizer, train_bpe_tokenizer
from .config import PretrainConfig, load_pretrain_config
from .data import PackedBatches, load_documents, make_batch, pack_rows, token_lists, tokenize_documents


STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "stage_summary.json"  # the same name as the post-training stages: written last, the stage is done


def pretrain(config_path: str | Path, overrides: list[str] | None = None) -> Path:
    """`apex-hf pretrain --config FILE [--key value ...]`: read and check the recipe, then run it."""
    return run_pretrain(load_pretrain_config(config_path, overrides))


# --------------------------------------------------------------------------------------------------------------------
# tokenizer, model, optimizer


def load_tokenizer(config: PretrainConfig, train_documents):
    if config.tokenizer.train_vocab_size is not None:
        texts = (text for batch in train_documents.iter(batch_size=1000) for text in batch[config.data.text_column])
        return train_bpe_tokenizer(texts, vocab_size=config.tokenizer.train_vocab_size)
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)


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
    kwargs: dict[str, Any] = {
        "dtype": config.model.dtype if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
    }
    if config.model.attn_implementation is not None:
        kwargs["attn_implementation"] = config.model.attn_implementation
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
    `{"step", "eval_loss"}`), sent to Accelerate's trackers and printed on the main process."""

    def __init__(self, accelerator: Accelerator, progress: tqdm):
        self.accelerator, self.progress = accelerator, progress
        self.history: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])
        if not self.accelerator.is_main_process:
            return
        if "eval_loss" in entry:
            line = f"held-out loss {entry['eval_loss']:.4f} (perplexity {entry['eval_perplexity']:.2f})"
        else:
            parts = [f"loss {entry['loss']:.4f}", f"lr {entry['learning_rate']:.2e}"]
            if "grad_norm" in entry:
                parts.append(f"grad norm {entry['grad_norm']:.3f}")
            line = " | ".join([*parts, f"{entry['train_tokens_per_second']:,.0f} tokens/s"])
            self.progress.set_postfix(loss=f"{entry['loss']:.3f}", tokens_s=f"{entry['train_tokens_per_second']:,.0f}")
        self.progress.write(f"[pretrain] step {entry['step']}: {line}")

    def state(self, config: PretrainConfig, step: int) -> dict[str, Any]:
        return {
            "global_step": step,
            "max_steps": config.max_steps,
            "logging_steps": config.logging_steps,
            "eval_steps": config.eval_steps,
            "save_steps": config.save_steps,
            "train_batch_size": config.per_device_train_batch_size,
            "log_history": self.history,
        }


def save(accelerator: Accelerator, model, tokenizer, directory: Path, state: dict[str, Any]) -> None:
    """Model, tokenizer and trainer state, written by the main process from the full (gathered) weights."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3: every process calls it
    if accelerator.is_main_process:
        # Regionally compiled layers are `OptimizedModule`s whose weights sit under `_orig_mod.`
        state_dict = {name.replace("_orig_mod.", ""): tensor for name, tensor in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)
        _write_json(directory / STATE_FILE, state)
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


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


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
    """Train as `config` says and return `output_dir` (see the module docstring for what it holds)."""
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
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        # The environment (an Accelerate/DeepSpeed config) overrides the argument, and the loop counts on the recipe's
        raise ValueError(
            f"the Accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; "
            f"set it only in the recipe (gradient_accumulation_steps={config.gradient_accumulation_steps})"
        )
    set_seed(config.seed)

    with accelerator.main_process_first():  # the main process fills datasets' cache; the others then read it
        train_documents, held_out_documents = load_documents(config.data, config.seed)
        tokenizer = load_tokenizer(config, train_documents)
    model = build_model(config, tokenizer)
    document_eos = document_eos_id(tokenizer)
    with accelerator.main_process_first():
        train_tokens = tokenize_documents(
            train_documents, tokenizer, config.data.text_column, document_eos, config.num_workers
        )
        train_batches = PackedBatches(
            train_tokens,
            config.seq_len,
            config.per_device_train_batch_size,
            config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        held_out = None
        if held_out_documents is not None:
            held_out_tokens = tokenize_documents(
                held_out_documents, tokenizer, config.data.text_column, document_eos, config.num_workers
            )
            held_out = held_out_rows(held_out_tokens, config, accelerator)

    model_config = model.config
    num_parameters = sum(p.numel() for p in model.parameters())
    # The config's output_router_logits is an inference default; in training the balance loss applies whenever its
    # coefficient is set.
    use_router_logits = model_config.num_experts > 0 and model_config.router_aux_loss_coef > 0
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
    )
    # Stepped once per optimizer step here, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = build_scheduler(optimizer, config)
    if config.activation_checkpointing:
        # transformers 5.23 renamed it (the old name is a deprecated alias); 5.17 has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    stats = ApexTrainingStats(model)

    progress = tqdm(total=config.max_steps, desc="pretrain", disable=not accelerator.is_local_main_process)
    log = TrainingLog(accelerator, progress)
    if config.report_to:
        accelerator.init_trackers(output_dir.name, config=_hparams(dataclasses.asdict(config)))
    tokens_per_step = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    ) * config.seq_len
    eval_losses = []

    def run_eval(step: int) -> None:
        loss = evaluate(model, held_out, config.per_device_train_batch_size, accelerator)
        eval_losses.append(loss)
        log.add({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))})

    if held_out is not None:
        run_eval(0)
    model.train()
    window_loss = torch.zeros((), device=accelerator.device)
    window_start, window_steps, paused, train_seconds = time.perf_counter(), 0, 0.0, 0.0
    for step in range(1, config.max_steps + 1):
        for _ in range(config.gradient_accumulation_steps):
            batch = {name: tensor.to(accelerator.device) for name, tensor in next(train_batches).items()}
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False, output_router_logits=use_router_logits).loss
                accelerator.backward(loss)
            window_loss += loss.detach() / config.gradient_accumulation_steps
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update()
        window_steps += 1

        if step % config.logging_steps == 0 or step == config.max_steps:
            mean_loss = accelerator.reduce(window_loss, "mean").item() / window_steps  # also waits for the device
            seconds = time.perf_counter() - window_start - paused
            train_seconds += seconds
            apex = stats.pop()
            apex.pop("train_tokens_per_second", None)  # per process and counting eval time: replaced below
            if apex:
                names = sorted(apex)
                means = accelerator.reduce(torch.tensor([apex[n] for n in names], device=accelerator.device), "mean")
                apex = dict(zip(names, means.tolist()))
            entry = {"step": step, "loss": mean_loss, "learning_rate": learning_rate}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)
            entry["train_tokens_per_second"] = window_steps * tokens_per_step / max(seconds, 1e-9)
            entry["num_input_tokens_seen"] = step * tokens_per_step
            log.add({**entry, **apex})
            window_loss.zero_()
            window_start, window_steps, paused = time.perf_counter(), 0, 0.0

        pause_start = time.perf_counter()
        if held_out is not None and (
            step == config.max_steps or (config.eval_steps and step % config.eval_steps == 0)
        ):
            run_eval(step)
        if config.save_steps and step % config.save_steps == 0 and step < config.max_steps:
            save(accelerator, model, tokenizer, output_dir / f"checkpoint-{step}", log.state(config, step))
        paused += time.perf_counter() - pause_start
    progress.close()

    save(accelerator, model, tokenizer, output_dir, log.state(config, config.max_steps))
    tokens_seen = config.max_steps * tokens_per_step
    summary = {
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        "num_input_tokens_seen": tokens_seen,
        "train_runtime": train_seconds,
        "train_tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - run_start,
        "num_parameters": num_parameters,
        "num_active_parameters": count(model_config, seq_len=config.seq_len).active,
        "num_processes": accelerator.num_processes,
        "config": dataclasses.asdict(config),
    }
    if accelerator.is_main_process:
        _write_json(output_dir / SUMMARY_FILE, summary)
        write_model_card(config, summary, output_dir)
        progress.write(
            f"[pretrain] done in {summary['wall_seconds']:.0f}s: {tokens_seen:,} tokens at "
            f"{summary['train_tokens_per_second']:,.0f} tokens/s; saved to {output_dir}"
        )
    accelerator.end_training()
    return output_dir
