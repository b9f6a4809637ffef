"""The training loop both trainings run on.

A training (the VAE, the text-to-video DiT) is a ``TrainTask``: it names its engines (module + optimizer section),
supplies batches from a data position, and performs one micro-step with the ``StepContext`` it is given. The
``Trainer`` owns everything else: engines, learning-rate schedules, EMA, non-finite-loss skipping, logging, the
progress bar, evaluation hooks, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from infra.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from infra.reshard import ReshardError
from infra.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch
from infra.config import OptimizerConfig, load_config, save_config, to_dict
from infra.data.skips import ShardSkipTotals
from infra.distributed import DistInfo, all_true, init_distributed, parse_entry_args, shutdown_distributed
from infra.ema import EMA
from infra.engine import build_engine, set_learning_rate
from infra.metric_log import MetricLogger
from infra.schedule import learning_rate
from infra.step_profiler import StepProfiler
from infra.unused_parameters import UnusedParameterGuard

log = logging.getLogger(__name__)


@dataclass
class EngineSpec:
    name: str
    module: nn.Module
    optimizer: OptimizerConfig
    ema: bool = False  # keep an EMA of this engine's weights (when run.ema_decay > 0)
    mpu: Any = None  # model-parallel unit for DeepSpeed (tensor parallelism): gradients reduced over its DP group


class TrainTask:
    """What a training supplies. Subclasses override the first three; the rest are optional."""

    # The rank's data-parallel index and the number of data-parallel ranks when ranks share batches (tensor /
    # sequence parallelism): the process RNG is seeded by the index, so the ranks of one model-parallel group draw
    # the same dropout, and a micro-step consumes ``data_parallel_size`` global batches. None: the global rank / size.
    data_parallel_rank: int | None = None
    data_parallel_size: int | None = None

    def engine_specs(self) -> list[EngineSpec]:
        raise NotImplementedError

    def batches(self, start_batch: int) -> Iterator[Any]:
        """This rank's batches from global batch ``start_batch`` on: ``start_batch + data rank``, then every
        ``data_parallel_size``-th (``infra.data.sampling.rank_batches``), identical to an uninterrupted stream."""
        raise NotImplementedError

    def train_step(self, batch: Any, step: int, ctx: "StepContext") -> dict[str, float | torch.Tensor]:
        """One micro-batch: compute losses, call ``ctx.backward_and_step``; return scalars to log (floats or 0-dim
        tensors, which are read only when logged). The trainer averages them over the log window and the ranks."""
        raise NotImplementedError

    def evaluate(self, step: int, ctx: "StepContext") -> dict[str, float]:
        return {}

    def on_train_end(self, ctx: "StepContext") -> None:
        """Called on every rank after the final checkpoint (e.g. to export the trained model)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class StepContext:
    """The engines, and the one way a task steps them (so every step gets the same non-finite-loss guard)."""

    def __init__(self, engines: dict, dist: DistInfo, output_dir: str, emas: dict[str, EMA], zero_stage: int = 0):
        self.engines, self.dist, self.output_dir, self.emas = engines, dist, output_dir, emas
        self.skipped_nonfinite = 0
        # With several ranks (or ZeRO-3), a parameter the loss does not reach on one rank breaks the reductions.
        self.guards = {name: UnusedParameterGuard(engine.module, name, zero_stage, dist.rank)
                       for name, engine in engines.items()} if dist.world_size > 1 or zero_stage == 3 else {}

    def engine(self, name: str):
        return self.engines[name]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def backward_and_step(self, name: str, loss: torch.Tensor) -> bool:
        """Backward and optimizer step on engine ``name``; skip (on every rank) if any rank's loss is not finite."""
        if not all_true(bool(torch.isfinite(loss.detach()).all())):
            self.skipped_nonfinite += 1
            log.warning("non-finite loss for %s: step skipped (%d so far)", name, self.skipped_nonfinite)
            return False
        engine = self.engines[name]
        if name in self.guards:
            loss = self.guards[name](loss)
        engine.backward(loss)
        engine.step()
        return True


class Trainer:
    def __init__(self, cfg: Any, task: TrainTask, dist: DistInfo):
        self.cfg, self.task, self.dist = cfg, task, dist
        self.run = cfg.run
        self.specs = {s.name: s for s in task.engine_specs()}
        self.engines = {n: build_engine(s.module, cfg.deepspeed, s.optimizer, dist.world_size, mpu=s.mpu)
                        for n, s in self.specs.items()}
        self.emas = {n: EMA(self.engines[n].module, self.run.ema_decay)
                     for n, s in self.specs.items() if s.ema and self.run.ema_decay > 0}
        self.ctx = StepContext(self.engines, dist, self.run.output_dir, self.emas, cfg.deepspeed.zero_stage)
        self.ckpt = CheckpointManager(f"{self.run.output_dir}/checkpoints", dist.rank, self.run.keep_last)
        self.logger = MetricLogger(self.run.output_dir, dist.is_main, self.run.tensorboard, self.run.wandb,
                                   self.run.wandb_project, to_dict(cfg))
        # data_position: global batches consumed (infra.data.sampling); a micro-step consumes data_world of them.
        self.step, self.data_position = 0, 0
        self.stop_reason = ""
        self.data_world = task.data_parallel_size or dist.world_size
        self.shard_skips = ShardSkipTotals()  # per shard and reason, reported at the end

    # ------------------------------------------------------------------------------------------ state
    def _trainer_state(self) -> dict:
        return {"step": self.step, "data_position": self.data_position, "data_order": "global",
                "world_size": self.dist.world_size, "data_parallel_size": self.data_world,
                "global_batch": self.data_world * self.cfg.deepspeed.gradient_accumulation_steps,
                "skipped_nonfinite": self.ctx.skipped_nonfinite, "config": to_dict(self.cfg)}

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"task.{k}": v for k, v in self.task.state_dict().items()}
        for name, ema in self.emas.items():
            tensors.update({f"ema.{name}.{k}": v for k, v in ema.state_dict(self.engines[name].module).items()})
        return tensors

    def save(self) -> None:
        # Under model parallelism (an engine with an mpu) each rank's EMA holds its own shards: keep every rank's.
        per_rank = any(spec.mpu is not None for spec in self.specs.values())
        path = self.ckpt.save(self.step, self.engines, self._trainer_state(), self._tensors(), per_rank=per_rank)
        if self.dist.is_main:
            log.info("saved checkpoint %s", path)

    def restore(self) -> None:
        """Resume from the newest checkpoint that verifies and loads; say which were passed over and why."""
        candidates = self.ckpt.candidates(self.run.resume)
        if not candidates:
            return
        failures = []
        for path in candidates:
            # Rank 0 hashes the files; every rank then takes the same branch.
            problems = verify_checkpoint(path, hashes=self.dist.is_main)
            verified, loaded = all_true(not problems), None
            if verified:
                try:
                    loaded = self.ckpt.load(path, self.engines)
                except ReshardError:  # not damaged: falling back would silently drop the newer steps
                    raise
                except Exception as e:  # any unreadable file: fall back, naming it
                    problems = [str(e)]
            if all_true(loaded is not None):
                break
            what = "verifies, but cannot be loaded" if verified else "does not verify"
            failures.append((path, what, problems or ["another rank could not verify or load it"]))
            log.error("checkpoint %s %s:\n  %s%s", path, what, "\n  ".join(failures[-1][2]),
                      "\nfalling back to the previous one" if path != candidates[-1] else "")
        else:
            raise CheckpointError("no checkpoint can be resumed from, so training does not resume from any:\n" +
                                  "\n".join(f"  {path} {what}:\n    " + "\n    ".join(problems)
                                             for path, what, problems in failures))
        state, tensors = loaded
        self.step, self.data_position = state["step"], state["data_position"]
        self._check_global_batch(state)
        self.ctx.skipped_nonfinite = state["skipped_nonfinite"]
        self.task.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("task.")})
        for name, ema in self.emas.items():
            ema.load_state_dict({k[len(name) + 5:]: v for k, v in tensors.items() if k.startswith(f"ema.{name}.")},
                                self.engines[name].module)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _check_global_batch(self, state: dict) -> None:
        """Say when a resumed run's batches per optimizer step differ from the saved run's (a new world size without
        the accumulation that keeps the global batch): it trains on, but no longer as the saved run would have."""
        ours = self.data_world * self.cfg.deepspeed.gradient_accumulation_steps
        saved = state.get("global_batch")
        if saved is not None and saved != ours and self.dist.is_main:
            log.warning("the checkpoint was written by %d data-parallel ranks x %d accumulation steps = %d batches per "
                        "step; this run takes %d x %d = %d: the data order is kept, but each step now averages %d "
                        "batches. Set deepspeed.gradient_accumulation_steps=%s to keep the global batch",
                        state["data_parallel_size"], saved // state["data_parallel_size"], saved, self.data_world,
                        self.cfg.deepspeed.gradient_accumulation_steps, ours, ours,
                        f"{saved // self.data_world}" if saved % self.data_world == 0 else
                        f"(not possible: {saved} is not a multiple of {self.data_world} ranks)")

    def _log_window(self, window: dict[str, list]) -> dict[str, float]:
        """The window's mean of every logged scalar over its micro-steps and every rank (keys a rank did not log,
        e.g. the loss of a batch kind it did not draw, are averaged over the ranks that did)."""
        local = {k: (float(sum(float(v) for v in values)), len(values)) for k, values in window.items()}
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, local)
        else:
            gathered = [local]
        totals: dict[str, list[float]] = {k: [0.0, 0] for k in window}  # this rank's keys first, in its order
        for part in gathered:
            for k, (total, count) in part.items():
                entry = totals.setdefault(k, [0.0, 0])
                entry[0] += total
                entry[1] += count
        return {k: total / count for k, (total, count) in totals.items()}

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        self.restore()
        if self.dist.is_main:
            save_config(self.cfg, f"{self.run.output_dir}/config.yaml")
        with PreemptionWatch() as watch:  # SIGTERM or a lost launcher: checkpoint, then stop
            result = self._loop(watch)
        self._report_skipped_shards()
        if result is None:
            return self._finish_preempted(self.stop_reason)
        self.task.on_train_end(self.ctx)
        self.logger.close()
        return result

    def release(self) -> None:
        """Free the engines now, while the process group and the interpreter are alive. DeepSpeed's autograd and
        module hooks tie each engine to its model through C++ references that Python's collector cannot see; left to
        the interpreter's exit, a gloo worker thread can then free a tensor after Python is gone and abort a finished
        run (SIGABRT, "terminate called without an active exception": once in a CI run of 2-rank torchrun, ZeRO-2).
        The trainer cannot train after this. Under ZeRO-3 the engine still lives on (DeepSpeed 0.19 keeps the top
        module on a module-global stack, ``parameter_offload.FWD_MODULE_STACK``, and its parameters carry closures over
        the engine's state in attributes that the collector cannot traverse)."""
        for engine in self.engines.values():
            engine.destroy()  # removes DeepSpeed's hooks, the C++ side of the cycle
        self.engines.clear()

    def _loop(self, watch: PreemptionWatch) -> dict[str, float] | None:
        """Train to the end (returns the last evaluation) or until preempted (checkpoints, returns None)."""
        accum = self.cfg.deepspeed.gradient_accumulation_steps
        stop_at = min(self.run.max_steps, self.run.stop_after or self.run.max_steps)
        # A DataLoader iterator draws its base seed from the global RNG when created; keep that draw out of the
        # training's random stream, or a resumed run (which creates it after restoring the RNG) would diverge.
        with torch.random.fork_rng(devices=[]):
            data = iter(self.task.batches(self.data_position))
        window: dict[str, list] = defaultdict(list)
        bar = tqdm(total=self.run.max_steps, initial=self.step, disable=not (self.dist.is_main and self.run.progress_bar),
                   desc="train", unit="step", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        if self.run.eval_at_start and self.step == 0:
            last_eval = self._evaluate()
        tick, samples, window_start = time.perf_counter(), 0, self.step
        profiler = StepProfiler(self.run.output_dir, self.run.profile_at, self.run.profile_steps, self.dist.is_main)
        while self.step < stop_at:
            profiler.start(self.step + 1)
            for name, spec in self.specs.items():
                set_learning_rate(self.engines[name], learning_rate(spec.optimizer, self.step))
            for _ in range(accum):
                batch = next(data)
                self.shard_skips.update(batch)
                self.data_position += self.data_world
                samples += _batch_size(batch)
                for k, v in self.task.train_step(batch, self.step, self.ctx).items():
                    window[k].append(v.detach() if isinstance(v, torch.Tensor) else float(v))
            for name, ema in self.emas.items():
                ema.update(self.engines[name].module)
            self.step += 1
            profiler.stop(self.step)
            bar.update(1)
            if self.step % self.run.log_every == 0 or self.step == stop_at:
                elapsed = time.perf_counter() - tick
                metrics = self._log_window(window)
                metrics.update({f"lr/{n}": learning_rate(s.optimizer, self.step - 1) for n, s in self.specs.items()},
                               skipped_nonfinite=self.ctx.skipped_nonfinite, samples_per_s=samples / elapsed,
                               step_s=elapsed / max(self.step - window_start, 1))
                if self.dist.device.type == "cuda":  # the benchmarks' peak memory under the engine
                    metrics["mem/peak_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
                self.logger.log(self.step, metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
                window.clear()
                tick, samples, window_start = time.perf_counter(), 0, self.step
            if self.run.eval_every and self.step % self.run.eval_every == 0:
                last_eval = self._evaluate()
            if self.run.save_every and self.step % self.run.save_every == 0:
                self.save()
            if self.step < stop_at and not all_true(watch.reason() is None):
                self.stop_reason = self._stop_reasons(watch.reason())
                log.warning("%s: checkpointing at step %d and stopping", self.stop_reason, self.step)
                if not (self.run.save_every and self.step % self.run.save_every == 0):
                    self.save()
                bar.close()
                return None
        if not self.run.eval_every or self.step % self.run.eval_every:
            last_eval = self._evaluate()
        if not (self.run.save_every and self.step % self.run.save_every == 0):
            self.save()
        bar.close()
        return last_eval

    def _report_skipped_shards(self) -> None:
        """One summary of every shard that had skips since this start, over all ranks, in the log and in
        ``<output_dir>/skipped_shards.json`` (collective)."""
        totals = self.shard_skips
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, totals)
            totals = gathered[0].merged(gathered[1:])
        summary = totals.summary()
        if summary and self.dist.is_main:
            log.warning("%s", summary)
            path = Path(self.run.output_dir) / "skipped_shards.json"
            path.write_text(json.dumps({"indexing": totals.indexing, "training": totals.loading}, indent=1))

    def _stop_reasons(self, mine: str | None) -> str:
        """Why the run stops, naming the ranks that asked (collective: every rank stops at the same step); on the
        node that did not lose its launcher, this says which rank did and why."""
        reasons: list = [mine]
        if self.dist.world_size > 1:
            reasons = [None] * self.dist.world_size
            torch.distributed.all_gather_object(reasons, mine)
        asked = [(rank, reason) for rank, reason in enumerate(reasons) if reason]
        return "; ".join(f"rank {rank}: {reason}" for rank, reason in asked) or "another rank stopped"

    def _finish_preempted(self, reason: str | None) -> None:
        self.logger.close()
        raise Preempted(f"preempted at step {self.step} of {self.run.max_steps} ({reason or 'another rank stopped'}); "
                        f"checkpoint saved under {self.ckpt.root}, no final export: run the same command again to "
                        "resume")

    def _evaluate(self) -> dict[str, float]:
        metrics = {f"eval/{k}": v for k, v in self.task.evaluate(self.step, self.ctx).items()}
        self.logger.log(self.step, metrics)
        return metrics


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return 1


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_training(schema: type, make_task: Callable[[Any, DistInfo], TrainTask], argv: list[str] | None = None,
                 description: str = "") -> dict[str, float]:
    """The body of every training entry point: parse, validate, start distributed, build the task, train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not faulthandler.is_enabled():  # a rank killed by a C++ abort prints where its Python threads were
        faulthandler.enable()
    args = parse_entry_args(argv, description)
    cfg = load_config(schema, args.config, args.overrides)
    dist = init_distributed(args.local_rank)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    # Model initialisation is identical on every rank; noise and dropout differ per rank through the data seed.
    seed_everything(cfg.run.seed)
    task = make_task(cfg, dist)
    data_rank = dist.rank if task.data_parallel_rank is None else task.data_parallel_rank
    seed_everything(cfg.run.seed + 1000 * data_rank)
    exit_code, trainer = 0, Trainer(cfg, task, dist)
    try:
        result = trainer.fit()
    except Preempted as e:
        log.warning("%s", e)
        exit_code = EXIT_PREEMPTED
    finally:
        trainer.release()
    del trainer, task
    shutdown_distributed()
    if exit_code:
        sys.exit(exit_code)
    return result
