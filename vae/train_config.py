"""The schema of a VAE training run (configs/vae/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field

from infra.config import DeepSpeedConfig, OptimizerConfig, RunConfig, check, join_key
from infra.data.config import DataConfig
from infra.metrics.lpips import LPIPSConfig
from vae.config import SSVAEConfig
from vae.losses import SSVAELossConfig


def _autoencoder_optimizer() -> OptimizerConfig:
    # The released recipe: Adam, lr 5e-5, warm-up from 2e-6 over 1,000 steps, cosine to 2e-6 over 600k steps.
    return OptimizerConfig(type="adam", lr=5e-5, betas=[0.9, 0.999], warmup_steps=1000, warmup_start_lr=2e-6,
                           decay_steps=600_000, min_lr=2e-6)


def _discriminator_optimizer() -> OptimizerConfig:
    return OptimizerConfig(type="adam", lr=5e-6, betas=[0.9, 0.999], warmup_steps=1000, warmup_start_lr=2e-7,
                           decay_steps=600_000, min_lr=2e-7)


@dataclass
class VAEEvalConfig:
    """Held-out clips reconstructed at every evaluation (``run.eval_every``)."""

    video_roots: str = ""  # empty: the training data's video roots
    num_clips: int = 2
    write_videos: bool = True  # side-by-side original | reconstruction mp4s under <output_dir>/reconstructions/

    def validate(self, prefix: str = "eval") -> None:
        check(self.num_clips >= 1, f"{prefix}.num_clips", f"must be >= 1, got {self.num_clips}")


@dataclass
class VAETrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: SSVAEConfig = field(default_factory=SSVAEConfig)
    loss: SSVAELossConfig = field(default_factory=SSVAELossConfig)
    perceptual: LPIPSConfig = field(default_factory=LPIPSConfig)
    optimizer: OptimizerConfig = field(default_factory=_autoencoder_optimizer)
    disc_optimizer: OptimizerConfig = field(default_factory=_discriminator_optimizer)
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)
    # Start from these weights: a save_pretrained folder of ours (stage 2 starts from stage 1's export), or the
    # released Lightning .ckpt / .safetensors (converted with vae.load_official). Empty: random initialisation.
    init_from: str = ""

    def validate(self, prefix: str = "") -> None:
        def key(name: str) -> str:
            return join_key(prefix, name)

        check(bool(self.data.video_roots or self.data.image_roots), key("data.video_roots"),
              "name at least one shard folder in data.video_roots or data.image_roots")
        # ZeRO-3 gathers a module's weights for its forward and backward and frees them after; the adaptive LCR and
        # GAN weights differentiate through the decoder a second time, after its weights were freed (measured on 2
        # ranks: "weight should have at least three dimensions" in the decoder's convs). A 315M VAE fits on every
        # rank; ZeRO-2 still partitions its optimizer states and gradients.
        check(self.deepspeed.zero_stage <= 2, key("deepspeed.zero_stage"),
              f"the VAE trains with ZeRO 0, 1 or 2, got {self.deepspeed.zero_stage}: ZeRO-3 frees the decoder's "
              "weights before the adaptive LCR/GAN weights differentiate through it again")
        # Clip shapes the model can encode: checked here, not when the first batch fails to.
        sc, tc = self.model.spatial_compression, self.model.temporal_compression
        shapes = [("data", self.data.num_frames, self.data.height, self.data.width)] + [
            (f"data.buckets[{i}]", b.frames, b.height, b.width) for i, b in enumerate(self.data.buckets)]
        for where, frames, height, width in shapes:
            for name, value in (("height", height), ("width", width)):
                check(value % sc == 0, key(f"{where}.{name}"),
                      f"must be a multiple of the model's spatial compression ({sc}), got {value}")
            check((frames - 1) % tc == 0, key(f"{where}.num_frames" if where == "data" else f"{where}.frames"),
                  f"must be 1 + {tc}k for the model's temporal compression, got {frames}")
        check(self.data.resize % sc == 0, key("data.resize"),
              f"must be a multiple of the model's spatial compression ({sc}), got {self.data.resize}")
        if self.loss.lcr.enabled:
            check(not self.model.encoder.frozen, key("loss.lcr.enabled"),
                  "LCR trains the encoder; it must be off when model.encoder.frozen is true (stage 2)")
