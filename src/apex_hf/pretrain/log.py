"""What a pre-training run logs, all of it in one object (`TrainingLog`): the log history, the window since the
previous log line, the training time, the trackers and the console."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..counting import ApexCount
from ..metrics import ApexTrainingStats, console_line
from .config import PretrainConfig


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has built in this process so far: a first compilation and every recompilation
    add one each."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class TrainingLog:
    """The run's logging state.

    - `history`: `log_history` entries as transformers' Trainer writes them (`{"step", "loss", "learning_rate",
      ...}`, `{"step", "eval_loss"}`), each sent whole to Accelerate's trackers; the main process prints a short line
      of each (`console_line`: the per-layer statistics would make it a thousand characters), and the progress bar
      shows loss, tokens/s, MFU and (tqdm's own) the time left;
    - the window since the previous log line: the summed training loss, the steps, and the time with evaluation and
      checkpoints paused out (`paused()`), so that tokens/s and MFU count training time only;
    - `train_seconds`: the training time of the whole run, a resumed one's earlier time included;
    - with `torch_compile`, the graphs compiled so far at the end of each window (`compiled_graphs` in each entry):
      after the first window, which holds the compilation, any new one is a recompilation.
    """

    def __init__(
        self,
        config: PretrainConfig,
        accelerator: Accelerator,
        model: torch.nn.Module,
        counts: ApexCount,
        peak_flops: float | None,
        start_step: int,
        history: list[dict[str, Any]],
        train_seconds: float,
    ):
        self.config, self.accelerator = config, accelerator
        self.history, self.train_seconds = history, train_seconds
        self.stats = ApexTrainingStats(model)
        self.tokens_per_step = (
            config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        ) * config.seq_len
        self.flops_per_token, self.peak_flops = counts.train_flops_per_token, peak_flops
        self.progress = tqdm(
            total=config.max_steps, initial=start_step, desc="pretrain", disable=not accelerator.is_local_main_process
        )
        self.loss = torch.zeros((), device=accelerator.device)
        # (steps, training seconds, graphs torch.compile has built by its end) of each log window of this process
        self.windows: list[tuple[int, float, int]] = []
        self.graphs_at_start = compiled_graphs()
        self.reset_window()

    # ---- the window since the previous log line

    def reset_window(self) -> None:
        self.loss.zero_()
        self.steps, self.paused_seconds, self._pause_start = 0, 0.0, None
        self.window_start = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss += loss

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints run inside: their time is not training time."""
        self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - self._pause_start
            self._pause_start = None

    def window_seconds(self) -> float:
        return (self._pause_start or time.perf_counter()) - self.window_start - self.paused_seconds

    # ---- entries

    def step_done(self, step: int, learning_rate: float, grad_norm) -> None:
        """Count an optimizer step; on a logging step (and the last), log the window."""
        self.progress.update()
        self.steps += 1
        if step % self.config.logging_steps == 0 or step == self.config.max_steps:
            self.add(self.train_entry(step, learning_rate, grad_norm))

    def train_entry(self, step: int, learning_rate: float, grad_norm) -> dict[str, Any]:
        """The log line of the steps since the previous one: loss, rates, Apex statistics, all processes averaged."""
        config, accelerator = self.config, self.accelerator
        mean_loss = accelerator.reduce(self.loss, "mean").item() / self.steps  # also waits for the device
        seconds = self.window_seconds()
        self.train_seconds += seconds
        self.windows.append((self.steps, seconds, compiled_graphs()))
        entry = {"step": step, "loss": mean_loss, "learning_rate": learning_rate}
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        entry["train_tokens_per_second"] = self.steps * self.tokens_per_step / max(seconds, 1e-9)
        if self.peak_flops:
            entry["mfu"] = self.mfu(entry["train_tokens_per_second"])
        entry["num_input_tokens_seen"] = step * self.tokens_per_step
        if config.torch_compile:
            entry["compiled_graphs"] = self.windows[-1][2] - self.graphs_at_start
        if config.data.is_weighted:
            weights = config.data.mixture_weights(step - 1)
            entry.update({f"data/weight/{name}": w for name, w in zip(config.data.sources, weights)})
        entry.update(self.apex_statistics())
        self.reset_window()
        return entry

    def apex_statistics(self) -> dict[str, float]:
        """`ApexTrainingStats` since the previous log line, averaged over the processes."""
        apex = self.stats.pop()
        apex.pop("train_tokens_per_second", None)  # per process and counting eval time: the entry has its own
        if not apex:
            return {}
        names = sorted(apex)
        means = self.accelerator.reduce(torch.tensor([apex[n] for n in names], device=self.accelerator.device), "mean")
        return dict(zip(names, means.tolist()))

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

    # ---- totals

    def mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation in % (torchtitan's convention, `apex_hf.counting`) against every device's peak;
        None where the peak is unknown."""
        if not self.peak_flops:
            return None
        return 100 * tokens_per_second * self.flops_per_token / (self.peak_flops * self.accelerator.num_processes)

    def steady_state(self) -> tuple[float | None, float | None]:
        """Tokens/s over the log windows after the first, and the first window's seconds: the first holds the
        warm-up (CUDA context and allocator, torch.compile's compilation), which a long run pays once. Tokens/s is
        None with fewer than two windows."""
        if not self.windows:
            return None, None
        warmup_seconds = self.windows[0][1]
        steady = self.windows[1:]
        if not steady:
            return None, warmup_seconds
        steps, seconds = sum(window[0] for window in steady), sum(window[1] for window in steady)
        return steps * self.tokens_per_step / max(seconds, 1e-9), warmup_seconds

    def graphs_compiled_after_warmup(self) -> int | None:
        """Graphs torch.compile built after the first log window: recompilations, each a stall in the steady state
        (`TORCH_LOGS=recompiles` says why). None without compilation or with fewer than two windows."""
        if not self.config.torch_compile or len(self.windows) < 2:
            return None
        return self.windows[-1][2] - self.windows[0][2]

    def eval_losses(self) -> list[float]:
        return [entry["eval_loss"] for entry in self.history if "eval_loss" in entry]

    def trainer_state(self, step: int) -> dict[str, Any]:
        """`trainer_state.json` at `step`, in the shape of transformers' Trainer."""
        config = self.config
        return {
            "global_step": step,
            "max_steps": config.max_steps,
            "logging_steps": config.logging_steps,
            "eval_steps": config.eval_steps,
            "save_steps": config.save_steps,
            "train_batch_size": config.per_device_train_batch_size,
            "train_runtime": self.train_seconds + self.window_seconds(),
            "log_history": self.history,
        }

    def close(self) -> None:
        self.progress.close()
