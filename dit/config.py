"""Configuration of the CogVideoX-style diffusion transformer.

Field names follow diffusers' ``CogVideoXTransformer3DModel`` wherever the meaning is the same, so that
converting a config is mostly a copy (see ``dit/convert.py``). Two deliberate differences:

* ``sample_frames`` counts *latent* frames (13 for CogVideoX), not pixel frames; diffusers stores 49 and a
  ``temporal_compression_ratio`` only to recover 13 from it.
* ``positional_embedding`` ("sincos" | "rope" | "learned") replaces the two booleans
  ``use_rotary_positional_embeddings`` / ``use_learned_positional_embeddings``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from infra.config import check, join_key

POSITIONAL_EMBEDDINGS = ("sincos", "rope", "learned")
ATTENTION_BACKENDS = ("sdpa", "flash")

# How many pixels one CogVideoX token covers along each spatial axis: its VAE compresses 8x and the
# transformer patchifies 2x2, so 16 pixels. A 16x VAE (SSVAE) keeps the same token count with patch 1.
PIXELS_PER_TOKEN = 16


@dataclass
class DiTConfig:
    num_layers: int = 30
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = None  # None: same as in_channels
    text_embed_dim: int = 4096
    max_text_seq_length: int = 226
    time_embed_dim: int = 512
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    # Patchify: patch_size x patch_size pixels of a latent frame per token; patch_size_t=None is the
    # CogVideoX 1.0 design (one frame per token, rope grid relative to the base resolution), an integer the
    # CogVideoX 1.5 design (patch_size_t frames per token, absolute rope grid).
    patch_size: int = 2
    patch_size_t: int | None = None
    patch_bias: bool = True

    # Positions: 3D sin-cos added to the video tokens (2B), 3D rotary on q/k of the video tokens (5B), or
    # rotary plus a learned table over text and video tokens (5B image-to-video).
    positional_embedding: str = "sincos"
    rope_theta: float = 10000.0
    # Base latent size the model was trained at: the rope grid of 1.0 models is expressed relative to it,
    # and a learned table has exactly this size.
    sample_height: int = 60
    sample_width: int = 90
    sample_frames: int = 13
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0

    attention_bias: bool = True
    qk_norm: bool = True
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    dropout: float = 0.0

    attention_backend: str = "sdpa"
    gradient_checkpointing: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def temporal_patch(self) -> int:
        return 1 if self.patch_size_t is None else self.patch_size_t

    def validate(self, prefix: str = "DiTConfig") -> "DiTConfig":
        """Returns itself, to chain; ``prefix``: where the fields sit in a run config (``model.overrides``)."""
        def key(name: str) -> str:
            return join_key(prefix, name)

        positive = [
            "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "text_embed_dim",
            "max_text_seq_length", "time_embed_dim", "patch_size", "sample_height", "sample_width", "sample_frames",
        ]
        for name in positive:
            check(getattr(self, name) > 0, key(name), f"must be positive, got {getattr(self, name)}")
        check(self.out_channels is None or self.out_channels > 0, key("out_channels"),
              f"must be positive or None, got {self.out_channels}")
        check(self.patch_size_t is None or self.patch_size_t > 0, key("patch_size_t"),
              f"must be positive or None, got {self.patch_size_t}")
        check(self.positional_embedding in POSITIONAL_EMBEDDINGS, key("positional_embedding"),
              f"must be one of {POSITIONAL_EMBEDDINGS}, got {self.positional_embedding!r}")
        check(self.attention_backend in ATTENTION_BACKENDS, key("attention_backend"),
              f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.positional_embedding == "sincos":
            # The sin-cos table splits the width 1/4 time, 3/8 height, 3/8 width, each in sin/cos halves.
            check(self.inner_dim % 16 == 0, key("attention_head_dim"),
                  f"x num_attention_heads = {self.inner_dim} must be divisible by 16 for positional_embedding='sincos'")
            check(self.patch_size_t is None, key("patch_size_t"),
                  "must be None with positional_embedding='sincos' (as in diffusers)")
        else:
            # Rotary splits each head 1/4 time, 3/8 height, 3/8 width, in rotated pairs.
            check(self.attention_head_dim % 16 == 0, key("attention_head_dim"),
                  f"must be divisible by 16 for rotary embeddings, got {self.attention_head_dim}")
        check(self.positional_embedding != "learned" or self.patch_size_t is None, key("patch_size_t"),
              "must be None with positional_embedding='learned'")
        check(0.0 <= self.dropout < 1.0, key("dropout"), f"must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0, key("norm_eps"), f"must be positive, got {self.norm_eps}")
        return self

    def replace(self, **overrides) -> "DiTConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"DiTConfig has no key(s) {sorted(unknown)}")
        return dataclasses.replace(self, **overrides).validate()

    def for_vae(self, latent_channels: int, spatial_compression: int) -> "DiTConfig":
        """This config adapted to a VAE: channels from its latents, patch size so that one token still covers
        16x16 pixels as in CogVideoX (patch 2 for an 8x VAE, patch 1 for a 16x VAE such as SSVAE)."""
        if spatial_compression <= 0 or PIXELS_PER_TOKEN % spatial_compression != 0:
            raise ValueError(
                f"spatial_compression must divide {PIXELS_PER_TOKEN}, got {spatial_compression}"
            )
        patch = PIXELS_PER_TOKEN // spatial_compression
        # Keep the base resolution (in pixels) of this config: 480x720 for CogVideoX.
        pixel_h = self.sample_height * (PIXELS_PER_TOKEN // self.patch_size)
        pixel_w = self.sample_width * (PIXELS_PER_TOKEN // self.patch_size)
        return self.replace(
            in_channels=latent_channels,
            out_channels=latent_channels,
            patch_size=patch,
            sample_height=max(patch, pixel_h // spatial_compression),
            sample_width=max(patch, pixel_w // spatial_compression),
        )

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name]).replace(**overrides)


PRESETS: dict[str, DiTConfig] = {
    # CogVideoX-2B: 30 layers x 1920 wide, 3D sin-cos positions.
    "cogvideox-2b": DiTConfig(num_layers=30, num_attention_heads=30, positional_embedding="sincos"),
    # CogVideoX-5B: 42 layers x 3072 wide, 3D rotary positions.
    "cogvideox-5b": DiTConfig(num_layers=42, num_attention_heads=48, positional_embedding="rope"),
    # Tiny CPU-sized variants for tests: 2 layers x 64 wide, short text, 16-channel latents.
    "tiny": DiTConfig(
        num_layers=2, num_attention_heads=4, attention_head_dim=16, text_embed_dim=32, max_text_seq_length=8,
        time_embed_dim=32, positional_embedding="rope", sample_height=8, sample_width=8, sample_frames=3,
    ),
    "tiny-sincos": DiTConfig(
        num_layers=2, num_attention_heads=4, attention_head_dim=16, text_embed_dim=32, max_text_seq_length=8,
        time_embed_dim=32, positional_embedding="sincos", sample_height=8, sample_width=8, sample_frames=3,
    ),
}
