"""Profile a few training steps with torch.profiler: where the step's time goes, before anything is made faster.

``run.profile_at=N`` (0: off) records steps N .. N + ``run.profile_steps`` - 1 on the main process and writes, under
``<output_dir>/profile/``:

- ``ops.txt``: the operators sorted by their own device time (CUDA) or CPU time, with call counts, the table to read
  first (kernels that dominate, host-side gaps, synchronisations);
- ``trace.json``: the Chrome / Perfetto trace of those steps (load it at ui.perfetto.dev) for the timeline.

Profiling slows the recorded steps; their ``step_s`` in metrics.jsonl is not a timing to quote.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    """``start(step)`` before a step and ``stop(step)`` after it; records the configured window only."""

    def __init__(self, output_dir: str | Path, first_step: int, num_steps: int, enabled: bool = True):
        self.folder = Path(output_dir) / "profile"
        self.first, self.last = first_step, first_step + num_steps - 1
        self.enabled = enabled and first_step > 0 and num_steps > 0
        self._profiler = None

    def start(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run (the trainer's ``self.step + 1``)."""
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self._profiler.__enter__()

    def stop(self, step: int) -> None:
        """``step``: the number of the step that just ran."""
        if self._profiler is None or step != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        cuda = torch.cuda.is_available()
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=60)
        (self.folder / "ops.txt").write_text(f"steps {self.first}..{self.last}, sorted by {sort_by}\n{table}\n")
        profiler.export_chrome_trace(str(self.folder / "trace.json"))
        log.info("profiled steps %d..%d: %s", self.first, self.last, self.folder)
