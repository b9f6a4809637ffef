"""VAE training on the shared engine: ``deepspeed --module vae.train --config configs/vae/<file>.yaml [k=v ...]``.

``model.kind`` picks the design: ``ssvae`` (ours), ``wan`` (diffusers' AutoencoderKLWan, Wan 2.2's design) or
``cogvideox`` (AutoencoderKLCogVideoX), all with the same losses (L1, LPIPS, KL, PatchGAN, LCR, LMR through a latent
mask token), engine, checkpoints and exact resume (``vae.diffusers_vaes``).

Two engines: ``autoencoder`` (the SSVAE and the loss's learned log-variance) and ``discriminator`` (the PatchGAN),
each with its own optimizer and schedule. Before ``loss.disc_start`` every step is a generator step; from then on
discriminator and generator steps alternate (``SSVAELoss.is_discriminator_step``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from infra.batch_generator import batch_generator
from infra.data.dataset import build_loader
from infra.data.skips import skip_logs
from infra.data.eval_clips import load_eval_clips
from infra.distributed import DistInfo
from infra.ema import maybe_averaged
from infra.metrics.image_quality import psnr as psnr_fn
from infra.metrics.lpips import LPIPS
from infra.trainer import EngineSpec, StepContext, TrainTask, run_training
from infra.video_io import side_by_side, write_video
from infra.zero3 import full_parameters, is_partitioned
from vae.diffusers_vaes import DiffusersVAE
from vae.losses import SSVAELoss
from vae.model import SSVAE
from vae.train_config import VAETrainConfig

log = logging.getLogger(__name__)


class AutoencoderWithLoss(nn.Module):
    """What the ``autoencoder`` engine trains: the SSVAE plus the loss's learned log-variance.

    The loss (with its discriminator and frozen perceptual network) is held but not registered as a submodule, so the
    discriminator's weights belong to the discriminator engine alone.
    """

    def __init__(self, vae: SSVAE, loss: SSVAELoss):
        super().__init__()
        self.vae = vae
        if loss.logvar.dim() == 0:  # DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
            loss.logvar = nn.Parameter(loss.logvar.detach().reshape(1), requires_grad=loss.logvar.requires_grad)
        self.logvar = loss.logvar
        object.__setattr__(self, "loss", loss)

    def forward(self, x: torch.Tensor, step: int | None, noise: torch.Generator | None = None,
                masking: torch.Generator | None = None, sample: bool = True):
        """(loss, logs) of a generator step; with ``step`` None, no loss: the decoded posterior (sampled, with LMR's
        masking, or its mean), in fp32. ``noise`` (on x's device) draws the posterior sample, ``masking`` (a CPU
        generator) the LMR mask; None: the process's RNG. Reconstruction is a forward too, so that ZeRO-3 gathers
        the parameters it uses outside any submodule's forward (the mask token) for it."""
        # Autocast is entered here, inside the module: the DeepSpeed engine's forward switches off a CUDA autocast
        # opened around it (unless its own torch_autocast section is on).
        with weights_autocast(x, self.vae.decoder_last_layer):
            posterior = self.vae.posterior(x)
            if sample:
                z, ratio = self.loss.apply_lmr(posterior.sample(noise), self.vae.mask_token, resolution=x.shape[3],
                                               generator=masking)
            else:
                z, ratio = posterior.mode(), None
            recon = self.vae.decode_latent(z)
            if step is None:
                return recon.float()
            lcr_on = self.loss.config.lcr.enabled
            loss, logs = self.loss.generator_loss(
                x, recon, posterior, step,
                encoder_last_layer=self.vae.encoder_last_layer if lcr_on else None,
                decoder_last_layer=self.vae.decoder_last_layer, lmr_ratio=ratio)
        return loss, logs

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = True, noise: torch.Generator | None = None,
                    masking: torch.Generator | None = None) -> torch.Tensor:
        """The decoded posterior (sampled, with LMR's masking, or its mean), in fp32; generators as in ``forward``."""
        return self(x, None, noise, masking, sample=sample)


def weights_autocast(x: torch.Tensor, weight: torch.Tensor):
    """Mixed precision for weights of lower precision than the data: DeepSpeed's bf16 mode casts the engines' weights
    to bf16 while the clips, the frozen LPIPS network and the loss's statistics stay fp32. Autocast then runs the
    convolutions in bf16 and keeps reductions (L1, KL sums, norms) in fp32. A no-op for fp32 weights."""
    return torch.autocast(x.device.type, dtype=weight.dtype, enabled=weight.dtype in (torch.bfloat16, torch.float16))


def build_vae(cfg: VAETrainConfig) -> SSVAE | DiffusersVAE:
    """The model ``model.kind`` names, from ``init_from`` when set: for ``ssvae`` a folder of ours or the released
    checkpoint, for ``wan`` / ``cogvideox`` a diffusers folder (a released VAE or an earlier run's export)."""
    source, kind = cfg.init_from, cfg.model.kind
    if kind != "ssvae":
        vae = DiffusersVAE.from_pretrained(kind, source) if source else DiffusersVAE.from_config(kind, cfg.model.design)
    elif not source:
        vae = SSVAE(cfg.model.design)
    elif Path(source).is_dir():
        vae = SSVAE.from_pretrained(source)
    else:
        from vae.official import load_official

        vae = load_official(source, cfg.model.design)
    if cfg.model.encoder.frozen:
        vae.encoder.requires_grad_(False)
    if not cfg.loss.lmr.enabled:  # the token then never reaches the loss: nothing to train, nothing to reduce
        vae.mask_token.requires_grad_(False)
    elif cfg.loss.lmr.token_init_std is not None:  # the config allows it only without init_from
        # Scale the model's own standard-normal draw rather than drawing again, so every other initial weight, and
        # the token's direction, stay what they are without this option.
        with torch.no_grad():
            vae.mask_token.mul_(cfg.loss.lmr.token_init_std)
    return vae


class VAETask(TrainTask):
    def __init__(self, cfg: VAETrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        perceptual = LPIPS.from_config(cfg.perceptual) if cfg.loss.perceptual_weight > 0 else None
        self.loss = SSVAELoss(cfg.loss, perceptual).to(dist.device)
        self.vae = build_vae(cfg)
        self.autoencoder = AutoencoderWithLoss(self.vae, self.loss)
        if self.loss.discriminator is not None:  # spectral norm's u/v: one update per step, the same on every rank
            self.loss.discriminator.iterate_per_step()
        self._power_iterated_at = -1
        self.eval_clips = None

    def engine_specs(self) -> list[EngineSpec]:
        specs = [EngineSpec("autoencoder", self.autoencoder, self.cfg.optimizer, ema=True)]
        if self.loss.discriminator is not None:
            specs.append(EngineSpec("discriminator", self.loss.discriminator, self.cfg.disc_optimizer))
        return specs

    def batches(self, start_batch: int):
        return build_loader(self.cfg.data, self.dist.rank, self.dist.world_size, self.cfg.run.seed, start_batch)

    def train_step(self, batch: dict, step: int, ctx: StepContext) -> dict[str, float]:
        x = batch["video"].to(ctx.device, non_blocking=True)
        logs = skip_logs(batch)
        # The batch's own draws (infra.batch_generator): the same on any number of ranks, and after a resume.
        noise = batch_generator(self.cfg.run.seed, batch["step"], ctx.device)
        masking = batch_generator(self.cfg.run.seed, batch["step"], "cpu", stream=1)
        if self.loss.gan_active(step) and self._power_iterated_at != step:
            with full_parameters(self.loss.discriminator):  # ZeRO-3: the weights are partitioned outside a forward
                self.loss.discriminator.power_iteration()  # before the step's first use of the discriminator
            self._power_iterated_at = step
        if self.loss.is_discriminator_step(step):
            recon = ctx.engine("autoencoder").module.reconstruct(x, noise=noise, masking=masking)
            with weights_autocast(x, next(self.loss.discriminator.parameters())):
                loss, disc_logs = self.loss.discriminator_loss(x, recon, step, ctx.engine("discriminator"))
            ctx.backward_and_step("discriminator", loss)
            return {**logs, **disc_logs}
        loss, gen_logs = ctx.engine("autoencoder")(x, step, noise, masking)
        ctx.backward_and_step("autoencoder", loss)
        return {**logs, **gen_logs, f"loss_{batch['kind']}": gen_logs["loss/total"]}

    @torch.no_grad()
    def evaluate(self, step: int, ctx: StepContext) -> dict[str, float]:
        """Reconstruct the held-out clips from the posterior mean (the EMA weights when kept); L1 and PSNR."""
        if self.eval_clips is None:
            d = self.cfg.data
            roots = self.cfg.eval.video_roots or d.video_roots
            # Whole frames: with data.resize the model trains on crops of frames that size.
            height, width = max(d.height, d.resize), max(d.width, d.resize)
            self.eval_clips = load_eval_clips(roots, self.cfg.eval.num_clips, d.num_frames, d.fps, height, width,
                                              d.decoder)["video"]
        module = ctx.engine("autoencoder").module
        module.eval()
        l1, psnr = [], []
        with maybe_averaged(ctx.emas.get("autoencoder"), module):
            for i, clip in enumerate(self.eval_clips):
                x = clip[None].to(ctx.device)
                recon = module.reconstruct(x, sample=False).clamp(-1, 1)
                l1.append((recon - x).abs().mean().item())
                psnr.append(float(psnr_fn(recon, x)[0]))
                if self.cfg.eval.write_videos and ctx.dist.is_main:
                    write_video(Path(ctx.output_dir) / "reconstructions" / f"step_{step:06d}" / f"clip{i}.mp4",
                                side_by_side(x[0], recon[0]), fps=self.cfg.data.fps)
        module.train()
        return {"rec_l1": sum(l1) / len(l1), "psnr": sum(psnr) / len(psnr)}

    def on_train_end(self, ctx: StepContext) -> None:
        """Export the model as a save_pretrained folder, ready for encode/decode and the DiT: ``model`` holds the
        EMA weights when an EMA is kept (what evaluation measured), ``model_raw`` the last trained weights. Under
        ZeRO-3 every rank enters the gathers of the partitions (the EMA's too); the first rank writes."""
        module = ctx.engine("autoencoder").module
        if not (ctx.dist.is_main or is_partitioned(module)):
            return
        out = Path(ctx.output_dir)
        ema = ctx.emas.get("autoencoder")
        with full_parameters(module):
            if ema is not None and ctx.dist.is_main:
                self.vae.save_pretrained(out / "model_raw")
        with maybe_averaged(ema, module), full_parameters(module):
            if ctx.dist.is_main:
                self.vae.save_pretrained(out / "model")


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_training(VAETrainConfig, VAETask, argv, description=__doc__)


if __name__ == "__main__":
    main()
