"""Starting from an open checkpoint.

- `families`: Llama / Qwen3 / Qwen3-MoE / Mixtral / DeepSeek-V3 / Gemma 3 / GPT-OSS / GLM-4 checkpoints to Apex and
  back, with the same outputs (`convert_checkpoint`, `export_checkpoint`, `convert_model`, `export_model`);
- `upcycle`: dense -> MoE and single pass -> refinement loop, with the outputs unchanged at initialisation.
"""
