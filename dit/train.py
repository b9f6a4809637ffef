"""Text-to-video training of the CogVideoX-style DiT on the shared engine.

    python -m dit.train --config configs/t2v/tiny.yaml [key=value ...]
    deepspeed --module dit.train --config configs/t2v/cogvideox_2b_ssvae.yaml

The DiT is the only engine. The first stage (VAE) and the text encoder are frozen: built once, in eval mode, without
gradients, outside every engine. Each micro-step takes clean latents and caption embeddings (encoded on the fly from
the shard data, or read from a cache written by ``dit.latent_cache``), drops 10% of captions to zero embeddings
for classifier-free guidance, and regresses v at a uniform timestep. Noise, timesteps and caption drops come from a
generator seeded by (run seed, global batch index) (``infra.batch_generator``), so they depend neither on the
process's RNG history nor on the number of ranks: a resumed run, a run on cached latents and a run on another number
of ranks draw exactly what an uninterrupted on-the-fly run draws.

Every ``run.eval_every`` steps and at the end, the fixed ``sampling.prompts`` are sampled (EMA weights if kept) and
decoded to mp4 under ``<output_dir>/samples/step_XXXXXX/``; at the end the DiT is also exported as a diffusers folder
``<output_dir>/dit`` for ``tools/sample_t2v``.

Parallelism (the ``parallel:`` section, docs/PARALLELISM.md) wraps the built DiT without touching its code: tensor
parallelism shards its attention and MLP linears (``apply_tensor_parallel``) and hands DeepSpeed a model-parallel
unit, Ulysses sequence parallelism routes its ordinary call through ``ulysses_forward``. The ranks of one TP x SP
group read the same batches, draw the same noise and sample the same prompts; data shards, seeds and prompt shares
follow the data-parallel rank.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from infra.config import ConfigError
from infra.batch_generator import batch_generator
from infra.data.dataset import build_loader
from infra.data.skips import skip_logs
from infra.distributed import DistInfo, barrier
from infra.ema import maybe_averaged
from infra.trainer import EngineSpec, StepContext, TrainTask, run_training
from infra.zero3 import full_parameters, is_partitioned
from vae.first_stage import FirstStage

from .convert import export_diffusers
from .diffusion import VPrediction, drop_text
from .latent_cache import COMPLETE, build_latent_loader, cache_latents, keyed_cache_dir, read_manifest
from .lora import LORA_DIR, add_adapters, export_adapter, load_base, merged_state_dict
from .parallelize import parallelize_dit
from .runtime import (EXPORT_DIR, build_dit, build_first_stage, build_frozen_text_encoder, encode_text, sample_prompts,
                      uses_text_mask)
from .tensor_parallel import gather_tensor_parallel_state_dict
from .train_config import T2VTrainConfig
from .transformer import CogVideoXTransformer

log = logging.getLogger(__name__)

ENGINE = "dit"


def check_cache_matches(cfg: T2VTrainConfig, cache_dir: str | Path) -> None:
    """Refuse a latent cache made by another first stage (the samples would be decoded by the wrong VAE) or for
    other clips than ``data`` describes (the samples would come out another size than the training clips), and
    ``latents.sample`` on a cache without log-variances."""
    manifest = read_manifest(cache_dir)
    made_with, ours = manifest["first_stage"], cfg.first_stage
    if (made_with["kind"] != ours.kind or Path(made_with["path"]).resolve() != Path(ours.path).resolve()
            or made_with.get("latent_transform", "") != ours.latent_transform):
        raise ConfigError(f"latents.cache_dir: {cache_dir} was made with first stage {made_with['kind']} "
                          f"at {made_with['path']} (transform {made_with.get('latent_transform') or 'none'}), the run "
                          f"uses {ours.kind} at {ours.path} (transform {ours.latent_transform or 'none'})")
    clip, d = manifest["clip"], cfg.data
    for key, ours_value in (("frames", d.num_frames), ("height", d.height), ("width", d.width), ("fps", d.fps)):
        if clip[key] != ours_value:
            name = "num_frames" if key == "frames" else key
            raise ConfigError(f"data.{name}: {ours_value}, but the latent cache {cache_dir} holds clips of "
                              f"{clip['frames']} frames of {clip['height']}x{clip['width']} at {clip['fps']} fps")
    if cfg.latents.sample and not manifest.get("posterior", False):
        raise ConfigError(f"latents.sample: the latent cache {cache_dir} holds posterior means only (made through a "
                          f"latent transform, or by an older version without log-variances); re-cache it or train "
                          f"on the means (latents.sample=false)")


def resolve_latent_cache(cfg: T2VTrainConfig, dist_info: DistInfo) -> str:
    """The run's cache folder: ``latents.cache_dir``, or under ``latents.cache_root`` the cache keyed by the run's
    data, first stage and text encoder, which the main process writes first when no run has (the others wait)."""
    if not cfg.latents.cache_root:
        return cfg.latents.cache_dir
    folder = keyed_cache_dir(cfg, cfg.latents.cache_root)
    if dist_info.is_main:
        if (folder / COMPLETE).is_file():
            log.info("latent cache %s: reused (same data, first stage and text encoder)", folder)
        else:
            log.info("latent cache %s: encoding the data once for every run like this one", folder)
            cache_latents(cfg, folder, device=dist_info.device, show_progress=cfg.run.progress_bar)
    barrier()
    return str(folder)


def check_clip_geometry(cfg: T2VTrainConfig, first_stage: FirstStage) -> None:
    """Training clips and samples the first stage can encode and decode: stop at start-up with the key named."""
    sc, tc = first_stage.spatial_compression, first_stage.temporal_compression
    frames, height, width = cfg.sample_shape()
    for key, value, step in (("data.height", cfg.data.height, sc), ("data.width", cfg.data.width, sc),
                             ("sampling.height", height, sc), ("sampling.width", width, sc)):
        if value % step:
            raise ConfigError(f"{key}: must be a multiple of the first stage's spatial compression ({step}), got {value}")
    for key, value in (("data.num_frames", cfg.data.num_frames), ("sampling.num_frames", frames)):
        if (value - 1) % tc:
            raise ConfigError(f"{key}: must be 1 + {tc}k for the first stage's temporal compression, got {value}")


class T2VTask(TrainTask):
    def __init__(self, cfg: T2VTrainConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        device = dist_info.device
        if not Path(cfg.first_stage.path).is_dir():
            raise ConfigError(f"first_stage.path: {cfg.first_stage.path} is not a folder (train the VAE first, or "
                              f"name a trained one)")
        self.cache_dir = resolve_latent_cache(cfg, dist_info) if cfg.latents.cached else ""
        if self.cache_dir:
            check_cache_matches(cfg, self.cache_dir)
        self.first_stage = build_first_stage(cfg, device)
        check_clip_geometry(cfg, self.first_stage)
        text_encoder = build_frozen_text_encoder(cfg, device)
        self.model = build_dit(cfg, self.first_stage, text_encoder.hidden_size)
        if cfg.lora.enabled:  # frozen base weights from lora.base, trainable peft adapters
            load_base(self.model, cfg.lora)
            add_adapters(self.model, cfg.lora)
        n_params = sum(p.numel() for p in self.model.parameters())
        parallel = parallelize_dit(self.model, cfg, dist_info.world_size, self.first_stage, device)
        self.model, self.mpu, self.parallel, self.dense_config = (parallel.model, parallel.mpu, parallel.groups,
                                                                  parallel.dense_config)
        # The trainer seeds the process RNG by the data rank and counts global batches by the data world size.
        self.data_parallel_rank, self.data_parallel_size = self.parallel.data_rank, self.parallel.data_world_size
        self.diffusion = VPrediction(cfg.diffusion.schedule)
        # The sampling prompts are encoded once; on cached latents the text encoder is then not needed any more.
        prompts = cfg.sampling.prompts if cfg.sampling.enabled else []
        self.prompt_states = encode_text(text_encoder, prompts, device) if prompts else None
        self.text_encoder = None if cfg.latents.cached else text_encoder
        self.text_mask = uses_text_mask(cfg, text_encoder)
        if dist_info.is_main:
            log.info("DiT %.1fM parameters: %s; parallel %s", n_params / 1e6, self.model.config, cfg.parallel)
            if cfg.lora.enabled:
                trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                log.info("LoRA rank %d on %s: %.3fM trainable parameters, base %s frozen", cfg.lora.rank,
                         list(cfg.lora.target_modules), trainable / 1e6, cfg.lora.base)

    # ----------------------------------------------------------------------------------------------- engines
    def engine_specs(self) -> list[EngineSpec]:
        return [EngineSpec(ENGINE, self.model, self.cfg.optimizer, ema=True, mpu=self.mpu)]

    # -------------------------------------------------------------------------------------------------- data
    def batches(self, start_batch: int):
        # Sharded by the data-parallel rank: the ranks of one TP x SP group read the same batches.
        cfg, rank, world = self.cfg, self.parallel.data_rank, self.parallel.data_world_size
        if cfg.latents.cached:
            return iter(build_latent_loader(self.cache_dir, cfg.data.video_batch_size, rank, world, cfg.run.seed,
                                            start_batch, cfg.data.num_workers, posterior=cfg.latents.sample))
        return iter(build_loader(cfg.data, rank, world, cfg.run.seed, start_batch,
                                 pin_memory=self.dist.device.type == "cuda"))

    def conditioning(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean latents (B, F, C, h, w) (the DiT's layout), text states (B, L, D) and mask (B, L) of a batch; cached
        latents with their log-variances (``latents.sample``) are drawn from the posterior with ``generator``."""
        device = self.dist.device
        if "latents" in batch:
            latents = batch["latents"].to(device).float()
            if "latents_logvar" in batch:
                std = batch["latents_logvar"].to(device).float().mul(0.5).exp()
                eps = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
                latents = latents + std * eps
            states, mask = batch["text_states"].to(device).float(), batch["text_mask"].to(device).bool()
        else:
            with torch.no_grad():
                latents = self.first_stage.encode(batch["video"].to(device)).float()
            states, mask = encode_text(self.text_encoder, batch["caption"], device)
        return latents.permute(0, 2, 1, 3, 4).contiguous(), states, mask

    # -------------------------------------------------------------------------------------------------- step
    def train_step(self, batch: dict, step: int, ctx: StepContext) -> dict[str, float]:
        g = batch_generator(self.cfg.run.seed, batch["step"], ctx.device)
        latents, states, mask = self.conditioning(batch, g)
        # Caption dropout for CFG: zero embeddings, attended in full, as the sampler's unconditional branch is.
        keep = drop_text(torch.ones(latents.shape[0], 1, device=ctx.device), self.cfg.diffusion.caption_dropout, g)
        states = states * keep[:, :, None]
        mask = mask | (keep == 0)
        model = ctx.engine(ENGINE)
        dtype = next(model.module.parameters()).dtype  # bf16 under deepspeed.precision=bf16
        loss = self.diffusion.training_loss(model, latents.to(dtype), states.to(dtype),
                                            mask if self.text_mask else None, generator=g)
        # Each SP rank's gradient is its tokens' share; DeepSpeed averages over a group holding the SP ranks, so
        # scaling by the SP size makes that average the sum (docs/PARALLELISM.md).
        ctx.backward_and_step(ENGINE, loss * self.parallel.sequence_parallel_size)
        # Tensors: the trainer reads them (and averages over the ranks) only when it logs.
        return {"loss": loss.detach().float(), "captions_dropped": (keep == 0).float().mean(), **skip_logs(batch)}

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int, ctx: StepContext) -> dict[str, float]:
        """Sample the fixed prompts to mp4, each data-parallel rank a share of them. The ranks of a TP x SP group
        sample the same prompts together (their forward is collective); the group's first rank writes the mp4s,
        the others' go to a discarded folder."""
        module = ctx.engine(ENGINE).module
        ema = ctx.emas.get(ENGINE) if self.cfg.sampling.use_ema else None
        written = 0
        with maybe_averaged(ema, module):
            was_training = module.training
            module.eval()
            if self.prompt_states is not None:
                leader = self.parallel.is_group_leader(self.dist.rank)
                out = Path(ctx.output_dir) / "samples" / f"step_{step:06d}"
                states, mask = self.prompt_states
                mine = list(range(self.parallel.data_rank, states.shape[0], self.parallel.data_world_size))
                if mine:
                    with tempfile.TemporaryDirectory() as scratch:
                        paths = sample_prompts(module, self.first_stage, states[mine],
                                               mask[mine] if self.text_mask else None, self.cfg,
                                               out if leader else scratch, indices=mine)
                    written = len(paths) if leader else 0
            module.train(was_training)
        barrier()
        return {"samples_written": float(written)}

    def on_train_end(self, ctx: StepContext) -> None:
        """Export the DiT (EMA weights when kept) as a diffusers folder for ``tools/sample_t2v``; a TP model's
        shards are gathered into the dense model first, a ZeRO-3 model's partitions into whole parameters."""
        module = ctx.engine(ENGINE).module
        tensor_parallel = self.parallel.tensor_parallel_size > 1
        # Collective under TP (the shards' gather) and ZeRO-3 (the partitions' gathers, the EMA's too).
        if tensor_parallel or is_partitioned(module) or self.dist.is_main:
            with maybe_averaged(ctx.emas.get(ENGINE), module), full_parameters(module):
                if tensor_parallel:  # collective over the TP group
                    state = gather_tensor_parallel_state_dict(module)
                    if self.dist.is_main:
                        dense = CogVideoXTransformer(self.dense_config)
                        dense.load_state_dict(state)
                        export_diffusers(dense, Path(ctx.output_dir) / EXPORT_DIR)
                elif not self.dist.is_main:
                    pass
                elif self.cfg.lora.enabled:  # the adapter in diffusers' format, and the base with it merged
                    export_adapter(module, self.cfg.lora, Path(ctx.output_dir) / LORA_DIR)
                    dense = CogVideoXTransformer(module.config)
                    dense.load_state_dict(merged_state_dict(module))
                    export_diffusers(dense, Path(ctx.output_dir) / EXPORT_DIR)
                else:
                    export_diffusers(module, Path(ctx.output_dir) / EXPORT_DIR)
        barrier()


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_training(T2VTrainConfig, T2VTask, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
