"""Metrics to JSONL (always), TensorBoard (when asked) and wandb (when installed and asked); rank 0 only."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 project: str = "ssvae-stack", config: dict | None = None):
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file; a resumed step re-logs with the same numbers.
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=project, dir=str(out), config=config, resume="allow")
            except ImportError:
                log.warning("run.wandb=true but wandb is not installed: pip install wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
