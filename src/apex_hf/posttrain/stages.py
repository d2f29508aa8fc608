"""Post-training stages on TRL's trainers: `run_stage(recipe)` for SFT, DPO and GRPO.

A stage loads the model and tokenizer named in its recipe (`apex_hf.posttrain.config`), gives the tokenizer a chat
template (resizing the embeddings if the vocabulary grew), loads the dataset mixture, wraps the model in LoRA when the
recipe has a `peft` section, trains with TRL, and leaves in `output_dir` a complete model folder: weights (LoRA merged
in; the adapter itself in `output_dir/adapter`), tokenizer, model card, `trainer_state.json` (the log history) and
`stage_summary.json` (the stage is complete), then `manifest.json`. That folder loads with
`from_pretrained(..., trust_remote_code=True)` where apex_hf is not installed, and is the next stage's model.

An `output_dir` that already holds something follows `apex_hf.outputs.check_output_dir`'s rule (`--resume`,
`--overwrite`); the finished files are staged next to it and moved in at the end (`apex_hf.outputs.RunFolder`), so a
failure leaves it as it was. Every `checkpoint-<step>` gets a manifest once the Trainer has saved it, and `--resume`
continues from the newest checkpoint that matches its manifest, saying why each newer one was skipped.

Apex-specific: the trainers are TRL's, with `ApexStatsMixin` adding Apex's own training statistics (verifier,
consistency, router z-loss, expert-load balance, tokens/s; see `apex_hf.metrics`) to every training log line.
TRL itself logs the router load-balancing loss (`aux_loss`) and, for GRPO, each reward's mean and std. The console
gets a short line per log step; the trackers (`report_to`) and `trainer_state.json` get every value.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from ..metrics import ApexTrainingStats, console_line
from ..outputs import RunFolder
from ..recipe import is_hub_repo_id
from ..stage_folder import STATE_FILE, check_model_folder, intact_checkpoints, write_manifest, write_summary
from ..tokenizer import prepare_chat_tokenizer
from .config import Recipe, load_datasets


class ShortProgressCallback(ProgressCallback):
    """transformers' progress bars, with `console_line` in place of the whole log entry (which, with the per-layer
    router statistics, runs to a thousand characters); trackers and the log history still get every value."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs or {})
        if state.is_world_process_zero and self.training_bar is not None and line:
            self.training_bar.write(f"[{self.stage}] step {state.global_step}: {line}")


class ShortPrinterCallback(PrinterCallback):
    """`PrinterCallback` (the console log under `disable_tqdm`), one `console_line` per log entry."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = console_line(logs or {})
        if state.is_local_process_zero and line:
            print(f"[{self.stage}] step {state.global_step}: {line}")


class CheckpointManifest(TrainerCallback):
    """Writes the manifest into each `checkpoint-<step>` once the Trainer has saved it (the Trainer calls `on_save`
    after the whole checkpoint is written), so that `--resume` can tell an intact checkpoint from a damaged one."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_manifest(folder)


class ApexStatsMixin:
    """Adds `ApexTrainingStats` to each training log line (those that carry `loss`). Values are the main process's
    own (not gathered): they describe the model, and every rank sees the same one. The console shows a short line
    per log step (`ShortProgressCallback`)."""

    stage = "train"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.apex_stats = ApexTrainingStats(self.model)
        self.add_callback(CheckpointManifest())
        for default, short in ((ProgressCallback, ShortProgressCallback), (PrinterCallback, ShortPrinterCallback)):
            if self.pop_callback(default) is not None:
                self.add_callback(short(self.stage))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.apex_stats.pop())
        super().log(logs, start_time)


class ApexSFTTrainer(ApexStatsMixin, SFTTrainer):
    stage = "sft"


class ApexDPOTrainer(ApexStatsMixin, DPOTrainer):
    stage = "dpo"


class ApexGRPOTrainer(ApexStatsMixin, GRPOTrainer):
    stage = "grpo"


TRAINERS = {"sft": ApexSFTTrainer, "dpo": ApexDPOTrainer, "grpo": ApexGRPOTrainer}


def load_tokenizer(recipe: Recipe):
    args = recipe.model
    return AutoTokenizer.from_pretrained(
        args.tokenizer_name_or_path or args.name_or_path,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )


def check_model_path(name_or_path: str) -> None:
    """A local folder that is not there would otherwise surface as a confusing Hub lookup error."""
    if not Path(name_or_path).exists() and not is_hub_repo_id(name_or_path):
        raise FileNotFoundError(f"model.name_or_path {name_or_path!r} is neither a folder nor a Hub repo id")


def load_model(recipe: Recipe, tokenizer):
    args = recipe.model
    kwargs = dict(revision=args.revision, trust_remote_code=args.trust_remote_code, **args.loading_kwargs())
    if args.load_in_4bit:
        from .lora import quantization_config

        kwargs["quantization_config"] = quantization_config(True)
    model = AutoModelForCausalLM.from_pretrained(args.name_or_path, **kwargs)
    prepare_chat_tokenizer(tokenizer, model, args.chat_template)
    return model


def build_trainer(recipe: Recipe):
    """The stage's trainer, ready to `train()`: model, tokenizer, data, LoRA and rewards from the recipe."""
    from transformers import set_seed

    set_seed(recipe.args.seed)
    check_model_path(recipe.model.name_or_path)
    check_model_folder(recipe.model.name_or_path)  # a damaged previous stage is named here, not met while loading
    tokenizer = load_tokenizer(recipe)
    model = load_model(recipe, tokenizer)
    train_dataset, eval_dataset = load_datasets(recipe.data)
    kwargs = dict(
        model=model,
        args=recipe.args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    if recipe.peft is not None:
        from .lora import build_lora_config

        kwargs["peft_config"] = build_lora_config(recipe.peft, model=model, where=f"{recipe.source} [peft]")
        # An adapter holds LoRA weights, not the router's correction-bias buffer that aux-loss-free balancing updates
        # on every training forward: keep the biases still, so base + adapter routes like the trained model.
        # (`save_stage` gives the merged model the input's rate back.)
        model.config.router_bias_update_rate = 0.0
    if recipe.stage == "grpo":
        from .rewards import resolve_reward

        kwargs["reward_funcs"] = [resolve_reward(spec) for spec in recipe.reward_funcs]
    return TRAINERS[recipe.stage](**kwargs)


def run_stage(recipe: Recipe, overwrite: bool = False) -> Path:
    """Train one stage and write its output folder; returns it. An `output_dir` that holds a run is continued with
    `resume_from_checkpoint`, replaced with `overwrite`, else refused before anything is loaded."""
    folder = RunFolder.open(recipe.args.output_dir, resume=resumes_in_place(recipe), overwrite=overwrite)
    try:
        return _train_stage(_in_work_folder(recipe, folder), folder)
    except BaseException:
        folder.discard()
        raise


def resumes_in_place(recipe: Recipe) -> bool:
    """Whether the stage continues a run of its own `output_dir` (`latest`, or a checkpoint folder inside it)."""
    requested, output_dir = recipe.args.resume_from_checkpoint, Path(recipe.args.output_dir)
    return requested == "latest" or (requested is not None and Path(requested).parent == output_dir)


def _in_work_folder(recipe: Recipe, folder: RunFolder) -> Recipe:
    """The recipe with the run's work folder as TRL's `output_dir` (it differs only with `--overwrite`)."""
    if folder.work == folder.final:
        return recipe
    args = copy.copy(recipe.args)
    args.output_dir = str(folder.work)
    return dataclasses.replace(recipe, args=args)


def _train_stage(recipe: Recipe, folder: RunFolder) -> Path:
    start = time.perf_counter()
    resume = recipe.args.resume_from_checkpoint
    if resume == "latest":  # the newest intact checkpoint; none is an error, never a silent fresh start
        resume = str(next(intact_checkpoints(folder.work, lambda message: print(f"[{recipe.stage}] {message}"))))
    trainer = build_trainer(recipe)
    train_output = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if trainer.accelerator.is_main_process:
        folder.new_staging()
    trainer.accelerator.wait_for_everyone()
    save_stage(trainer, recipe, folder.staging, folder.final)
    if trainer.accelerator.is_main_process:
        # trainer_state.json: the log history, as every Trainer checkpoint has it
        trainer.state.save_to_json(str(folder.staging / STATE_FILE))
        summary = {
            "stage": recipe.stage,
            "recipe": recipe.source,
            "model": recipe.model.name_or_path,
            "global_step": trainer.state.global_step,
            "train_loss": train_output.training_loss,
            "final_eval": final_eval,
            "wall_seconds": time.perf_counter() - start,
        }
        write_summary(folder.staging, summary)
        folder.publish()
        if recipe.args.push_to_hub:
            push_folder(recipe, folder.final)
    trainer.accelerator.wait_for_everyone()
    return folder.final


def save_stage(trainer, recipe: Recipe, output_dir: Path, final: Path) -> Path:
    """Weights (LoRA merged), tokenizer and model card into `output_dir` (the staging folder of the stage folder
    `final`); with LoRA, the adapter in `adapter/`.

    Merging happens in memory on the trained model; a 4-bit (QLoRA) or FSDP-sharded model cannot be merged there,
    so its folder holds the adapter only (merge it onto the full-precision base with `apex-hf merge-lora`).
    """
    from peft import PeftModel

    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        trainer.save_model(str(output_dir / "adapter"))
        if recipe.model.load_in_4bit or trainer.is_fsdp_enabled:
            return output_dir
        model = model.merge_and_unload()
        model.config.router_bias_update_rate = AutoConfig.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        ).router_bias_update_rate
        if trainer.accelerator.is_main_process:
            model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        write_trl_model_card(trainer, recipe, output_dir, final)
    return output_dir


def hub_dataset_ids(recipe: Recipe) -> list[str]:
    """The mixture's datasets that are Hub repos (local files and builder names such as `json` are not)."""
    return [d.path for d in recipe.data.datasets if d.data_files is None and is_hub_repo_id(d.path)]


def write_trl_model_card(trainer, recipe: Recipe, output_dir: Path, final: Path) -> None:
    """TRL's model card (library_name, base_model when the input is a Hub repo, tags), with every Hub dataset of the
    mixture in its metadata, into `output_dir` for the stage folder `final`. TRL writes it to the Trainer's own
    `output_dir`; it is edited from there into `output_dir`, whose copy replaces it when the stage is published."""
    from huggingface_hub import ModelCard

    datasets = hub_dataset_ids(recipe)
    trainer.create_model_card(
        model_name=f"{final.parent.name}-{final.name}",
        dataset_name=datasets[0] if datasets else None,
        tags=["apex", recipe.stage] + (["lora"] if recipe.peft is not None else []),
    )
    card = ModelCard.load(Path(trainer.args.output_dir) / "README.md")
    card.data.datasets = datasets or None
    if card.data.base_model is None:  # a local input folder: TRL's template would link to huggingface.co/None
        card.text = card.text.replace(
            "[None](https://huggingface.co/None)", f"the local model `{recipe.model.name_or_path}`"
        )
    card.save(output_dir / "README.md")


def push_folder(recipe: Recipe, output_dir: Path) -> None:
    """Upload the finished stage folder (not its intermediate checkpoints) to `hub_model_id`."""
    from huggingface_hub import HfApi

    args = recipe.args
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id or output_dir.name, private=args.hub_private_repo, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id.repo_id,
        folder_path=output_dir,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**"],
        commit_message=f"apex-hf {recipe.stage} stage",
    )
