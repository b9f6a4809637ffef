"""The schema of a VAE training run (configs/vae/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from infra.config import DeepSpeedConfig, OptimizerConfig, RunConfig, check, join_key
from infra.data.config import DataConfig
from infra.metrics.lpips import LPIPSConfig
from vae.config import SSVAEConfig
from vae.diffusers_vaes import CogVideoXVAEConfig, WanVAEConfig, check_buildable
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


VAE_KINDS = ("ssvae", "wan", "cogvideox")


def _latent_size(model: "VAEModelConfig", frames: int, height: int, width: int) -> tuple[int, int, int]:
    tc, sc = model.temporal_compression, model.spatial_compression
    return 1 + (frames - 1) // tc, height // sc, width // sc


@dataclass
class VAEModelConfig(SSVAEConfig):
    """The ``model:`` section: which design trains (``kind``) and its settings. ``ssvae`` takes ``encoder`` /
    ``decoder`` (as the released model), ``wan`` the ``wan:`` section (diffusers' AutoencoderKLWan, Wan 2.2's design by
    default), ``cogvideox`` the ``cogvideox:`` section (AutoencoderKLCogVideoX); the other sections are ignored."""

    kind: str = "ssvae"
    wan: WanVAEConfig = field(default_factory=WanVAEConfig)
    cogvideox: CogVideoXVAEConfig = field(default_factory=CogVideoXVAEConfig)

    @property
    def design(self) -> "SSVAEConfig | WanVAEConfig | CogVideoXVAEConfig":
        if self.kind == "wan":
            return self.wan
        if self.kind == "cogvideox":
            return self.cogvideox
        # A plain SSVAEConfig: the model saves its config, and a saved folder must not carry the training-only keys.
        return SSVAEConfig(**{f.name: getattr(self, f.name) for f in fields(SSVAEConfig)})

    @property
    def z_channels(self) -> int:
        return self.design.z_channels

    @property
    def spatial_compression(self) -> int:
        return self.design.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.design.temporal_compression

    def validate(self, prefix: str = "model") -> None:
        check(self.kind in VAE_KINDS, join_key(prefix, "kind"), f"must be one of {VAE_KINDS}, got {self.kind!r}")
        if self.kind == "ssvae":
            super().validate(prefix)
            return
        section = join_key(prefix, self.kind)
        self.design.validate(section)
        check_buildable(self.design, section)


@dataclass
class VAETrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
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
        # Clip shapes the model can encode: checked here, not when the first batch fails to.
        sc, tc = self.model.spatial_compression, self.model.temporal_compression
        shapes = [("data", self.data.num_frames, self.data.height, self.data.width)] + [
            (f"data.buckets[{i}]", b.frames, b.height, b.width) for i, b in enumerate(self.data.buckets)]
        # The PatchGAN's two 4x4 convs after max_spatial_down need frames of 3x that (else it fails at disc_start).
        disc_min = 3 * self.loss.discriminator.max_spatial_down if self.loss.disc_weight > 0 else 0
        for where, frames, height, width in shapes:
            for name, value in (("height", height), ("width", width)):
                check(value % sc == 0, key(f"{where}.{name}"),
                      f"must be a multiple of the model's spatial compression ({sc}), got {value}")
                check(value >= disc_min, key("loss.discriminator.max_spatial_down"),
                      f"the discriminator needs frames of at least 3 x {disc_min // 3} = {disc_min} px, and "
                      f"{where}.{name} is {value}: lower it to {1 << max(0, (value // 3).bit_length() - 1)} or "
                      f"less, or train on larger frames")
            check((frames - 1) % tc == 0, key(f"{where}.num_frames" if where == "data" else f"{where}.frames"),
                  f"must be 1 + {tc}k for the model's temporal compression, got {frames}")
        check(self.data.resize % sc == 0, key("data.resize"),
              f"must be a multiple of the model's spatial compression ({sc}), got {self.data.resize}")
        check(self.model.kind == "ssvae" or not self.model.encoder.frozen, key("model.encoder.frozen"),
              f"freezes the SSVAE's encoder; model.kind is {self.model.kind!r}")
        self._check_latent_fits_the_regularizers(key)
        if self.loss.lmr.token_init_std is not None:
            check(self.loss.lmr.enabled, key("loss.lmr.token_init_std"),
                  "scales LMR's mask token, but loss.lmr.enabled is false: set it to null or turn LMR on")
            # A loaded model's token is its own (ours, the released one), or a fresh one its loader made (diffusers
            # designs): rescaling it either way would not be the initialisation the option names.
            check(not self.init_from, key("loss.lmr.token_init_std"),
                  f"sets the mask token of a model built from scratch, but init_from is {self.init_from!r}: set "
                  f"it to null, or leave init_from empty")
        if self.loss.lcr.enabled:
            check(not self.model.encoder.frozen, key("loss.lcr.enabled"),
                  "LCR trains the encoder; it must be off when model.encoder.frozen is true (stage 2)")

    def _check_latent_fits_the_regularizers(self, key) -> None:
        """LMR's blocks and LCR's windows must fit the latent of every training clip shape (LMR is keyed by the clip
        height, its training resolution): checked at start-up, not when a batch of that shape first comes."""
        shapes = []  # (bucket, is an image), for the kinds the run draws
        if self.data.image_prob < 1:
            shapes += [(b, False) for b in self.data.video_buckets()]
        if self.data.image_prob > 0:
            shapes += [(b, True) for b in self.data.image_buckets()]
        lmr, lcr = self.loss.lmr, self.loss.lcr
        for bucket, image in shapes:
            t, h, w = _latent_size(self.model, bucket.frames, bucket.height, bucket.width)
            what = f"the {'image' if image else 'video'} clips ({bucket.frames}x{bucket.height}x{bucket.width})"
            if lmr.enabled:
                check(bucket.height in lmr.mask_probs, key("loss.lmr.mask_probs"),
                      f"has no entry for training resolution {bucket.height} (the height of {what}); configured: "
                      f"{sorted(lmr.mask_probs)}")
                bt, bh, bw = (int(v) for v in lmr.block_sizes[bucket.height])
                # An image's single latent frame takes the block's first frame only (vae.lmr clips time for images).
                check(bh <= h and bw <= w and (image or bt <= t), key(f"loss.lmr.block_sizes.{bucket.height}"),
                      f"block {[bt, bh, bw]} is larger than the {t}x{h}x{w} latent of {what}")
            if lcr.enabled:
                _, wh, ww = (int(v) for v in lcr.window)
                check(wh <= h and ww <= w, key("loss.lcr.window"),
                      f"{list(lcr.window)} is larger than the {h}x{w} latent frames of {what}")

