"""Per-iteration metrics to the console, TensorBoard and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from localopt_plugin.metric_names import ITERATION, VALID_LOSS
from localopt_plugin.platform import cuda_available
from localopt_plugin.training.distributed import is_rank0

log = logging.getLogger("localopt_plugin.train")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if cuda_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLogger:
    """``run``: the RunConfig (log interval, metrics file, TensorBoard, progress bar)."""

    def __init__(self, run, start_iteration: int = 0) -> None:
        self.enabled = is_rank0()
        self.interval = max(1, run.log_interval)
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not self.enabled:
            return
        if run.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(run.metrics_file)), exist_ok=True)
            self.jsonl = open(run.metrics_file, "a")  # noqa: SIM115 (closed in close())
        if run.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=run.tensorboard_dir,
                                        max_queue=run.tensorboard_queue_size)
        show_bar = run.progress == "on" or (run.progress == "auto" and sys.stderr.isatty())
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=run.train_iters, initial=start_iteration, unit="it",
                            dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        iteration = record[ITERATION]
        record["memory (MB)"] = peak_memory_mb()
        if self.writer is not None:
            for key, value in record.items():
                if key != ITERATION:
                    self.writer.add_scalar(key, value, iteration)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.get('lm loss', float('nan')):.4f}")
        if iteration % self.interval == 0 or VALID_LOSS in record:
            text = " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in record.items()
            )
            (self.bar.write if self.bar is not None else log.info)(text)

    def summary(self, values: dict) -> None:
        """The end-of-run summary: logged and written as TensorBoard text."""
        if not self.enabled:
            return
        text = "training finished: " + " | ".join(
            f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        (self.bar.write if self.bar is not None else log.info)(text)
        if self.writer is not None:
            self.writer.add_text("summary", text)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
