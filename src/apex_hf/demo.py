"""`apex-hf demo`: a CPU-only, few-minute end-to-end run of Apex.

Steps: train a byte-level BPE tokenizer on the corpus -> build the `apex-small` preset -> pack the corpus into
fixed-length rows, holding out ~5% of the documents -> train with plain PyTorch AdamW (warmup + cosine, gradient
clipping) -> held-out loss / perplexity before and after, and per number of refinement passes K -> `save_pretrained`
-> reload in a fresh Python process in which `apex_hf` cannot be imported (Hub-style remote code) and generate.

Deliberately self-contained and free of trainer frameworks; a later version replaces the training part with the
SFT -> DPO -> GRPO recipe chain. Entry points: `add_demo_arguments(parser)` + `run_demo(args)` (used by
`apex-hf demo`), or `python -m apex_hf.demo`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# The demo never talks to the Hub (set before transformers is imported by anything below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "tiny_corpus.txt"
DEFAULT_PROMPT = "A function definition"


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to `parser` (a top-level parser or an `apex-hf demo` subparser)."""
    parser.add_argument("--preset", default="apex-small", help="model preset (apex_hf.presets), default: apex-small")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="UTF-8 text, documents separated by blank lines")
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the corpus")
    parser.add_argument(
        "--vocab-size", type=int, default=1024, help="BPE vocabulary size (incl. 256 bytes + specials)"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warmup steps (default: 10%% of --steps)"
    )
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    parser.add_argument("--log-every", type=int, default=25, help="print training stats every N steps")
    parser.add_argument("--output-dir", default="outputs/demo", help="where the model and tokenizer are saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: available cores, max 8)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the greedy generation after reload")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip-reload", action="store_true", help="skip the fresh-process reload + generation")
    return parser


# ------------------------------------------------------------------------------------------------------------------
# data


def _read_documents(path: str | Path, max_chars: int | None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} not found; pass --corpus PATH (the repo ships data/tiny_corpus.txt)")
    text = path.read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    docs = [doc.strip() for doc in text.split("\n\n")]
    return [doc for doc in docs if doc]


def _split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Every n-th document is held out (whole documents, so no validation text leaks into training rows)."""
    if len(docs) < 2:
        raise ValueError(f"the corpus needs at least 2 documents (blank-line separated), got {len(docs)}")
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else len(docs) + 1
    val_index = {i for i in range(len(docs)) if i % every == every - 1} or {len(docs) - 1}
    train = [doc for i, doc in enumerate(docs) if i not in val_index]
    val = [doc for i, doc in enumerate(docs) if i in val_index]
    return train, val


def _pack(tokenizer, docs: list[str], seq_len: int):
    """Tokenize, join documents with eos, cut into `[rows, seq_len]` (the tail shorter than a row is dropped)."""
    import torch

    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len), len(ids)


# ------------------------------------------------------------------------------------------------------------------
# model


def _build_config(args, tokenizer):
    from .presets import get_preset

    token_ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = get_preset(args.preset, **token_ids)
    needed = args.seq_len + args.max_new_tokens + 64
    if config.max_position_embeddings < needed:
        config = get_preset(args.preset, max_position_embeddings=needed, **token_ids)
    return config


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _evaluate(model, rows, batch_size: int, num_refinement_steps: int | None = None) -> float:
    """Mean next-token cross-entropy over the held-out rows (every target token weighted equally)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            out = model(input_ids=batch, labels=batch, use_cache=False, num_refinement_steps=num_refinement_steps)
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += out.loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _format_aux(aux: dict) -> str:
    return " ".join(f"{name}={float(value):.4f}" for name, value in sorted(aux.items()))


# ------------------------------------------------------------------------------------------------------------------
# fresh-process reload


# Runs under `python -I` (no cwd / user site / PYTHON* env on sys.path) from an empty directory, with `apex_hf`
# blocked at import level (an editable install would otherwise still expose it): the checkpoint must load from the
# code that save_pretrained copied next to the weights, as it would from the Hub.
_RELOAD_SCRIPT = r"""
import importlib.abc, json, sys, time

class _BlockApexHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "apex_hf" or name.startswith("apex_hf."):
            raise ImportError(f"{name} is blocked: this process must load Apex as remote code")
        return None

sys.meta_path.insert(0, _BlockApexHF())

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], trust_remote_code=True)  # it reads config.json (auto_map)
model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], trust_remote_code=True)
model.eval()
assert not any(m == "apex_hf" or m.startswith("apex_hf.") for m in sys.modules), "apex_hf was imported"
inputs = tokenizer(spec["prompt"], return_tensors="pt")
result = {"model_class": f"{type(model).__module__}.{type(model).__name__}", "generations": {}}
for k in spec["ks"]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                             num_refinement_steps=k, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    result["generations"][str(k)] = {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "token_ids": new_tokens.tolist(),
        "tokens_per_s": len(new_tokens) / max(seconds, 1e-9),
    }
print("RESULT_JSON=" + json.dumps(result))
"""


def _reload_in_fresh_process(model_dir: Path, prompt: str, ks: list[int], max_new_tokens: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="apex_reload_") as workdir:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", workdir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # a private dynamic-module cache: the remote code is copied there from model_dir, nothing stale is reused
            "HF_MODULES_CACHE": str(Path(workdir) / "hf_modules"),
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        spec = {"model_dir": str(model_dir.resolve()), "prompt": prompt, "ks": ks, "max_new_tokens": max_new_tokens}
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _RELOAD_SCRIPT, json.dumps(spec)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process reload failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if "RESULT_JSON=" in line:
            return json.loads(line.split("RESULT_JSON=", 1)[1])
    raise RuntimeError(f"fresh-process reload printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------------------------------
# the demo


def run_demo(args: argparse.Namespace) -> dict:
    """Run the demo; returns a summary dict (losses, generations, paths, timings). See the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from . import ApexForCausalLM  # noqa: F401  (registers the `apex` model type with the Auto classes)
    from .tokenizer import train_bpe_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    threads = args.threads or min(
        8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)

    def say(msg: str = "") -> None:
        print(msg, flush=True)

    # 1. tokenizer + data
    docs = _read_documents(args.corpus, args.max_chars)
    train_docs, val_docs = _split_documents(docs, args.val_fraction)
    tokenizer = train_bpe_tokenizer(train_docs, vocab_size=args.vocab_size, model_max_length=args.seq_len)
    train_rows, train_tokens = _pack(tokenizer, train_docs, args.seq_len)
    val_rows, _ = _pack(tokenizer, val_docs, args.seq_len)
    if train_rows.shape[0] == 0 or val_rows.shape[0] == 0:
        raise ValueError(
            f"corpus too small for --seq-len {args.seq_len}: {train_rows.shape[0]} train / {val_rows.shape[0]} "
            f"held-out rows; use a larger corpus or a shorter --seq-len"
        )
    say(f"[demo] {threads} CPU threads | corpus {args.corpus}: {len(docs)} documents ({len(val_docs)} held out)")
    say(
        f"[demo] tokenizer: byte-level BPE, vocab {len(tokenizer)} | {train_tokens} train tokens -> "
        f"{train_rows.shape[0]} train rows + {val_rows.shape[0]} held-out rows of {args.seq_len}"
    )

    # 2. model
    config = _build_config(args, tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    default_k, max_k = config.num_refinement_steps, config.max_refinement_steps
    say(
        f"[demo] model: preset {args.preset!r}, {_param_count(model) / 1e6:.2f}M parameters | "
        f"prelude {config.num_prelude_layers} -> core {config.num_core_layers} x K={default_k} (max {max_k}) -> "
        f"coda {config.num_coda_layers} | attention {config.attention_type} | experts {config.num_experts} | "
        f"memory {config.memory_injection}"
    )

    # 3. held-out loss before training
    initial_val_loss = _evaluate(model, val_rows, args.batch_size)
    say(f"[demo] held-out loss before training: {initial_val_loss:.4f} (ppl {math.exp(initial_val_loss):.1f})")

    # 4. train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    use_router_logits = config.num_experts > 0
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(train_rows.shape[0], generator=generator)
    cursor = 0
    train_losses: list[float] = []
    window_tokens, window_start = 0, time.perf_counter()
    train_start = window_start
    for step in range(args.steps):
        if cursor + args.batch_size > order.numel():
            order, cursor = torch.randperm(train_rows.shape[0], generator=generator), 0
        batch = train_rows[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        lr = _lr_at(step, args.steps, warmup, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        out = model(input_ids=batch, labels=batch, use_cache=False, output_router_logits=use_router_logits)
        out.loss.backward()  # verifier / consistency / z-loss gradients ride along via the autograd identity
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        train_losses.append(out.loss.item())
        window_tokens += batch.numel()
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - window_start
            aux = dict(model.model.aux_losses)
            if out.aux_loss is not None:
                aux["router_balance_loss"] = out.aux_loss.detach()
            say(
                f"[train] step {step + 1:4d}/{args.steps} loss {train_losses[-1]:.4f} lr {lr:.2e} "
                f"gnorm {float(grad_norm):.2f} {window_tokens / max(elapsed, 1e-9):,.0f} tok/s | {_format_aux(aux)}"
            )
            window_tokens, window_start = 0, time.perf_counter()
    train_seconds = time.perf_counter() - train_start

    # 5. held-out loss after training, per number of refinement passes (test-time compute)
    model.eval()
    val_loss_by_k = {
        k: _evaluate(model, val_rows, args.batch_size, num_refinement_steps=k) for k in range(1, max_k + 1)
    }
    final_val_loss = val_loss_by_k[default_k]
    say(
        f"[demo] held-out loss: {initial_val_loss:.4f} -> {final_val_loss:.4f} "
        f"(ppl {math.exp(initial_val_loss):.1f} -> {math.exp(final_val_loss):.1f}) after {args.steps} steps "
        f"in {train_seconds:.0f}s"
    )
    for k, loss in val_loss_by_k.items():
        tag = " (trained default)" if k == default_k else ""
        say(f"[demo]   K={k} refinement passes: held-out loss {loss:.4f} (ppl {math.exp(loss):.1f}){tag}")

    # 6. save (save_pretrained copies configuration_apex.py / modeling_apex.py next to the weights: auto_map)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    say(f"[demo] saved model + tokenizer to {output_dir}: {', '.join(sorted(p.name for p in output_dir.iterdir()))}")

    # 7. in-process greedy generation (reference for the reload check)
    ks = sorted({1, default_k})
    inputs = tokenizer(args.prompt, return_tensors="pt")
    local_ids = {}
    with torch.no_grad():
        for k in ks:
            generated = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                num_refinement_steps=k,
                pad_token_id=tokenizer.pad_token_id,
            )
            local_ids[str(k)] = generated[0, inputs["input_ids"].shape[1] :].tolist()

    # 8. reload in a fresh process where apex_hf is not importable, and generate with K=1 and the default K
    reload = None
    if not args.skip_reload:
        reload = _reload_in_fresh_process(output_dir, args.prompt, ks, args.max_new_tokens, threads)
        reload["matches_in_process"] = all(
            reload["generations"][k]["token_ids"] == ids for k, ids in local_ids.items()
        )
        say(f"[reload] fresh `python -I` process, apex_hf blocked, loaded {reload['model_class']} (trust_remote_code)")
        for k in ks:
            gen = reload["generations"][str(k)]
            say(f"[reload] K={k} greedy ({gen['tokens_per_s']:.0f} tok/s): {args.prompt!r} -> {gen['text']!r}")
        say(f"[reload] same tokens as the in-process model: {reload['matches_in_process']}")

    wall = time.perf_counter() - t0
    say(f"[demo] done in {wall:.0f}s")
    return {
        "output_dir": str(output_dir),
        "preset": args.preset,
        "num_parameters": _param_count(model),
        "vocab_size": len(tokenizer),
        "train_rows": int(train_rows.shape[0]),
        "val_rows": int(val_rows.shape[0]),
        "initial_val_loss": initial_val_loss,
        "final_val_loss": final_val_loss,
        "val_loss_by_k": val_loss_by_k,
        "default_refinement_steps": default_k,
        "train_losses": train_losses,
        "train_seconds": train_seconds,
        "local_generations": local_ids,
        "reload": reload,
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = add_demo_arguments(argparse.ArgumentParser(prog="python -m apex_hf.demo", description=__doc__))
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    main()
