"""The parts a pre-training run is built from (`PretrainRun.build`): the processes, the tokenizer, the model, the
packed batches and held-out rows, the optimizer and its schedule.

The same parts serve one CPU, one GPU, or many processes under `accelerate launch --config_file
recipes/accelerate/<x>.yaml` (DDP, FSDP2, DeepSpeed ZeRO-2/3): the tokenizer is trained on the main process only, the
held-out rows are dealt out evenly, and DeepSpeed gets the settings that Accelerate cannot pass on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, TorchDynamoPlugin, parse_flag_from_env
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler, get_wsd_schedule

from ..modeling.modeling_apex import ApexSparseMoeBlock
from ..tokenizer import EOS_TOKEN, prepare_chat_tokenizer, train_bpe_tokenizer
from .config import PretrainConfig
from .data import PackedBatches, pack_rows, token_lists, tokenize_documents


# `torch_compile: auto` compiles runs of at least this many steps on a GPU. On bench-moe (H200), regional compilation
# makes a step about 0.08 s shorter (0.169 s instead of 0.246) and costs about 14 s once: a 100-step run took 36.4 s
# compiled against 30.5 s eager (2026-11, before fused AdamW). Even at about 180 steps; 200 leaves a margin.
COMPILE_AUTO_MIN_STEPS = 200


def compiles(config: PretrainConfig) -> bool:
    """Whether the run compiles its decoder layers: the recipe's `torch_compile`, or for "auto", whether it trains on
    a GPU (Accelerate's choice: CUDA, unless ACCELERATE_USE_CPU) for at least `COMPILE_AUTO_MIN_STEPS` steps."""
    if config.torch_compile != "auto":
        return config.torch_compile
    on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return on_gpu and config.max_steps >= COMPILE_AUTO_MIN_STEPS


def make_accelerator(config: PretrainConfig) -> Accelerator:
    """Accelerate for the recipe, whose `torch_compile` is decided (true or false, see `compiles`), refused where the
    launch and Accelerate disagree on the processes, on gradient accumulation or on compilation."""
    if not isinstance(config.torch_compile, bool):
        raise ValueError(
            f"torch_compile must be decided before Accelerate starts (`compiles`), got {config.torch_compile!r}"
        )
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to or None,
        project_dir=str(Path(config.output_dir)),
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
    compiling = accelerator.state.dynamo_plugin.backend != DynamoBackend.NO
    if compiling != config.torch_compile:
        # Accelerate keeps one state per process, and the first Accelerator's plugin (or ACCELERATE_DYNAMO_BACKEND)
        # decides it: the recipe's setting would otherwise be dropped without a word
        raise RuntimeError(
            f"torch_compile={config.torch_compile}, but Accelerate's state in this process has "
            f"{'compilation' if compiling else 'no compilation'} (an Accelerator made earlier in the process, or "
            f"ACCELERATE_DYNAMO_BACKEND, decides it for the whole process); set it in the recipe only, and run the "
            f"stage in a process of its own (`apex-hf pretrain`)"
        )
    return accelerator


def build_tokenizer(config: PretrainConfig, sources: dict, accelerator: Accelerator):
    """The recipe's tokenizer, or a byte-level BPE trained on every training source. The main process trains it and
    saves it to `output_dir`, where the others load it: each process training its own could disagree on ties."""
    if config.tokenizer.train_vocab_size is None:
        return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    if accelerator.is_main_process:
        column = config.data.text_column
        texts = (
            text for dataset in sources.values() for batch in dataset.iter(batch_size=1000) for text in batch[column]
        )
        tokenizer = train_bpe_tokenizer(texts, vocab_size=config.tokenizer.train_vocab_size)
        tokenizer.save_pretrained(Path(config.output_dir))
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(Path(config.output_dir))


def document_eos_id(tokenizer) -> int:
    """The token that ends each document: `<|endoftext|>` where the vocabulary has it (Apex's BPE, GPT-2, Qwen),
    because once a chat template is set, eos is the end of a turn (`<|im_end|>`), and a checkpoint's saved tokenizer
    has one; else the eos."""
    vocab = tokenizer.get_vocab()
    token_id = vocab[EOS_TOKEN] if EOS_TOKEN in vocab else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end documents with")
    return token_id


def build_device(accelerator: Accelerator) -> torch.device:
    """Where a new model's weights are created and initialised: on the GPU itself where each process holds the whole
    model (one GPU, DDP), since initialising bench-moe's 2.6B parameters on the CPU and copying them over took a
    tenth of a 300-step run. Sharded runs (FSDP, DeepSpeed) build on the CPU, from which their wrappers shard."""
    whole_model = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)
    return accelerator.device if accelerator.device.type == "cuda" and whole_model else torch.device("cpu")


def build_model(config: PretrainConfig, tokenizer, device: torch.device | str = "cpu"):
    """A new model from the preset, sized to the tokenizer and created on `device`, or the checkpoint; then the
    tokenizer's chat template (which may add the ChatML turn tokens and resize the embeddings)."""
    kwargs = config.model.loading_kwargs()
    if config.model.preset is not None:
        model_config = config.model_config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        with torch.device(device):
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


def build_batches(config: PretrainConfig, accelerator: Accelerator, tokenizer, sources: dict, held_out_documents):
    """This process's training batches and held-out rows (None without a held-out set), tokenized by the main
    process first (it fills datasets' cache; the others then read it)."""
    document_eos = document_eos_id(tokenizer)

    def tokenize(documents):
        return tokenize_documents(documents, tokenizer, config.data.text_column, document_eos, config.num_workers)

    with accelerator.main_process_first():
        train_batches = PackedBatches(
            {name: tokenize(documents) for name, documents in sources.items()},
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
            held_out = held_out_rows(tokenize(held_out_documents), config, accelerator)
    return train_batches, held_out


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, experts, and the embedding, which with tied weights is also the output
    layer, as in nanoGPT and Llama), none on norm gains and biases: they set scales, which decay would only shrink."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def prepare_training(accelerator: Accelerator, model: torch.nn.Module, config: PretrainConfig):
    """The model and AdamW prepared by Accelerate (activation checkpointing and DeepSpeed's settings first), and the
    learning-rate schedule on the prepared optimizer: `(model, optimizer, scheduler)`."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        fused=uses_fused_adamw(accelerator),
    )
    if config.activation_checkpointing:
        # transformers 5.23 renamed it (the old name is a deprecated alias); 5.17 has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    # On the prepared optimizer, whose param_groups DeepSpeed ZeRO-3 has regrouped; stepped once per optimizer step
    # by the loop, not prepared: Accelerate's scheduler wrapper steps once per process.
    scheduler = build_scheduler(optimizer, config)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler


def uses_fused_adamw(accelerator: Accelerator) -> bool:
    """AdamW's fused CUDA kernel on GPUs: one launch per parameter group instead of a few per tensor (the foreach
    default took a fifth of a bench-moe step on an H100). DeepSpeed steps its own partitioned copy of the optimizer,
    and the CPU demo keeps the default kernel its recipes were tuned with."""
    return accelerator.device.type == "cuda" and accelerator.distributed_type != DistributedType.DEEPSPEED


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
