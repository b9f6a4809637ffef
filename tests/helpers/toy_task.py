"""A tiny regression training on the shared trainer, used to test the engine, checkpoints and exact resume.

Run as a script (python, torchrun or the deepspeed launcher): ``toy_task.py --config x.yaml key=value ...``.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from infra.data.sampling import rank_batches  # noqa: E402
from infra.config import DeepSpeedConfig, OptimizerConfig, RunConfig  # noqa: E402
from infra.trainer import EngineSpec, TrainTask, run_training  # noqa: E402


@dataclass
class ToyConfig:
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-2, warmup_steps=2, decay_steps=20))
    batch_size: int = 4
    nan_at_step: int = -1  # make the loss NaN at this step (tests the skip)
    step_sleep: float = 0.0  # seconds per step, to leave time to signal a running training
    branch_on_even_batches: bool = False  # a parameter only even global batches use (rank 1 of 2 never does)
    hidden: int = 32  # width of the hidden layer (wide: ZeRO partitions large enough for torch to run in parallel)


class ToyTask(TrainTask):
    def __init__(self, cfg: ToyConfig, dist_info):
        self.cfg, self.dist = cfg, dist_info
        self.model = nn.Sequential(nn.Linear(8, cfg.hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(cfg.hidden, 1))
        if cfg.branch_on_even_batches:
            self.model.register_parameter("branch", nn.Parameter(torch.zeros(1)))
        self.target = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))

    def engine_specs(self):
        return [EngineSpec("model", self.model, self.cfg.optimizer, ema=True)]

    def batches(self, start_batch):
        # Global batch i depends only on (seed, i): resumable without replay, the same on any number of ranks.
        for i in rank_batches(start_batch, self.dist.rank, self.dist.world_size):
            g = torch.Generator().manual_seed(self.cfg.run.seed * 100003 + i * 101)
            x = torch.randn(self.cfg.batch_size, 8, generator=g)
            yield {"x": x, "y": x @ self.target, "step": i}

    def train_step(self, batch, step, ctx):
        model = ctx.engine("model")
        pred = model(batch["x"]) + 0.01 * torch.randn(batch["x"].shape[0], 1)  # consumes the torch RNG
        if self.cfg.branch_on_even_batches and batch["step"] % 2 == 0:
            pred = pred + model.module.branch
        loss = ((pred - batch["y"]) ** 2).mean()
        if step == self.cfg.nan_at_step:
            loss = loss * float("nan")
        ctx.backward_and_step("model", loss)
        if self.cfg.step_sleep:
            time.sleep(self.cfg.step_sleep)
        return {"loss": loss.detach()}

    def evaluate(self, step, ctx):
        with torch.no_grad():
            x = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
            ctx.engine("model").eval()
            err = ((ctx.engine("model")(x) - x @ self.target) ** 2).mean().item()
            ctx.engine("model").train()
        return {"mse": err}

    def on_train_end(self, ctx):
        if self.dist.is_main:  # the final export a finished run writes
            (Path(self.cfg.run.output_dir) / "export.txt").write_text("done\n")


if __name__ == "__main__":
    run_training(ToyConfig, ToyTask)
