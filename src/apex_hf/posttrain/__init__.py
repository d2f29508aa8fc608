"""Post-training on TRL: SFT, DPO and GRPO stages, LoRA, and GRPO's rewards.

- `config`: a stage's recipe (`load_recipe`), checked before anything is loaded;
- `stages`: `run_stage(recipe)`, TRL's trainers with Apex's statistics in their logs, and the stage folder it leaves;
- `lora`: Apex's default LoRA targets (registered with PEFT once it is imported), QLoRA, `merge_lora`;
- `rewards`: GRPO's reward functions, by name or dotted path.
"""
