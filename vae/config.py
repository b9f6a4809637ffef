"""Typed configuration of the SSVAE encoder, decoder and whole model.

Field names are ours; `SSVAEConfig.from_official` maps the released YAML's `encoder_config.params` /
`decoder_config.params` onto them (e.g. `out_ch` -> `out_channels`, the encoder's `temporal_upsample` list, which
in the released code says which levels *down*-sample time, -> `temporal_downsample`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from infra.config import check, join_key

NORM_KINDS = ("rmsnorm", "groupnorm")
INITS = ("default", "residual_zero")
PATCH_SIZES = (1, 2)  # pixels per side folded into channels at the input (2: Wan 2.2's VAE)


def _check_resizable(a: int, b: int, prefix: str, what: str) -> None:
    """A parameter-free shortcut between widths a and b repeats or averages channels: one must divide the other."""
    check(max(a, b) % min(a, b) == 0, join_key(prefix, "boundary_shortcuts"),
          f"needs {what} widths that divide one another, got {a} and {b}")


def _check_common(cfg: "EncoderConfig | DecoderConfig", prefix: str, temporal_key: str) -> None:
    def key(name: str) -> str:
        return join_key(prefix, name)

    check(cfg.ch >= 1, key("ch"), f"must be >= 1, got {cfg.ch}")
    check(len(cfg.ch_mult) >= 1 and all(m >= 1 for m in cfg.ch_mult), key("ch_mult"),
          f"must be a non-empty list of positive ints, got {cfg.ch_mult}")
    for name in ("num_res_blocks", "num_mid_blocks", "z_channels"):
        check(getattr(cfg, name) >= 1, key(name), f"must be >= 1, got {getattr(cfg, name)}")
    check(cfg.norm in NORM_KINDS, key("norm"), f"must be one of {NORM_KINDS}, got {cfg.norm!r}")
    check(0.0 <= cfg.dropout < 1.0, key("dropout"), f"must be in [0, 1), got {cfg.dropout}")
    temporal = getattr(cfg, temporal_key)
    check(len(temporal) == len(cfg.ch_mult) - 1, key(temporal_key),
          f"needs one entry per resampling (len(ch_mult) - 1 = {len(cfg.ch_mult) - 1}), got {len(temporal)}")
    check(cfg.init in INITS, key("init"), f"must be one of {INITS}, got {cfg.init!r}")
    check(cfg.patch_size in PATCH_SIZES, key("patch_size"), f"must be one of {PATCH_SIZES}, got {cfg.patch_size}")
    if cfg.norm == "groupnorm":
        widths = {cfg.ch * m for m in cfg.ch_mult} | {cfg.ch}
        bad = sorted(w for w in widths if w % 32)
        check(not bad, key("norm"), f"'groupnorm' needs channel widths divisible by 32, got {bad}")


@dataclass
class EncoderConfig:
    """Video -> 2*z_channels moments (mean and log-variance)."""

    in_channels: int = 3
    ch: int = 32
    ch_mult: tuple[int, ...] = (2, 4, 8, 16, 16)
    num_res_blocks: int = 3
    num_mid_blocks: int = 2
    z_channels: int = 48
    # One flag per down-sampling (len(ch_mult) - 1): True = halve time as well as space.
    temporal_downsample: tuple[bool, ...] = (False, False, True, True)
    norm: str = "rmsnorm"
    dropout: float = 0.0
    mid_attention: bool = True
    gradient_checkpointing: bool = False
    # Stage 2 of the recipe fine-tunes the decoder only.
    frozen: bool = False
    # DC-AE's residual autoencoding at the latent boundary too (the released model has it only in its resampling):
    # conv_in adds its input repeated over channels, the posterior mean adds the last features averaged down to
    # z_channels. With init "residual_zero" the untrained encoder is then a fixed local averaging of pixels.
    boundary_shortcuts: bool = False
    # "residual_zero": the last conv of every residual branch (resnet blocks, resampling, boundary convs) starts at
    # zero, so training starts from the shortcuts alone; "default": PyTorch's initialisation (the released model).
    init: str = "default"
    # Initial bias of the posterior log-variance channels (with init "residual_zero"): a small posterior noise at
    # the start lets the decoder read the latent before the KL term shapes the variance.
    logvar_init: float = 0.0
    # Each frame's p x p pixel patches become channels before conv_in (Wan 2.2's VAE does this with p = 2): the
    # full-resolution level then runs at half the resolution and p x p more input channels, and the spatial
    # compression is p x 2^(len(ch_mult) - 1). 1: none (the released model); 1 or 2.
    patch_size: int = 1

    @property
    def patched_channels(self) -> int:
        """Channels conv_in sees: the input's, times the pixels of a patch."""
        return self.in_channels * self.patch_size ** 2

    def validate(self, prefix: str = "encoder") -> None:
        check(self.in_channels >= 1, join_key(prefix, "in_channels"), f"must be >= 1, got {self.in_channels}")
        _check_common(self, prefix, "temporal_downsample")
        check(self.logvar_init == 0.0 or self.init == "residual_zero", join_key(prefix, "logvar_init"),
              f"applies with init 'residual_zero', got init {self.init!r}")
        if self.boundary_shortcuts:
            _check_resizable(self.patched_channels, self.ch, prefix, "in_channels x patch_size^2 and ch")
            _check_resizable(self.ch * self.ch_mult[-1], self.z_channels, prefix, "the last level's and z_channels")


@dataclass
class DecoderConfig:
    """z_channels latent -> video."""

    out_channels: int = 3
    ch: int = 32
    ch_mult: tuple[int, ...] = (2, 4, 8, 16, 16)
    num_res_blocks: int = 3
    num_mid_blocks: int = 2
    z_channels: int = 48
    # One flag per up-sampling, in decoding order: True = double time (T -> 2T - 1) as well as space.
    temporal_upsample: tuple[bool, ...] = (True, True, False, False)
    norm: str = "rmsnorm"
    dropout: float = 0.0
    mid_attention: bool = True
    gradient_checkpointing: bool = False
    # As the encoder's: conv_in adds the latent repeated over channels, the output adds the last features averaged
    # down to out_channels; with init "residual_zero" the untrained decoder is a fixed un-pooling.
    boundary_shortcuts: bool = False
    init: str = "default"
    # The encoder's patch_size: the output conv makes p x p pixels per position, shuffled back into the frame.
    patch_size: int = 1

    @property
    def patched_channels(self) -> int:
        """Channels the output conv makes: the output's, times the pixels of a patch."""
        return self.out_channels * self.patch_size ** 2

    def validate(self, prefix: str = "decoder") -> None:
        check(self.out_channels >= 1, join_key(prefix, "out_channels"), f"must be >= 1, got {self.out_channels}")
        _check_common(self, prefix, "temporal_upsample")
        if self.boundary_shortcuts:
            _check_resizable(self.z_channels, self.ch * self.ch_mult[-1], prefix, "z_channels and the first level's")
            _check_resizable(self.ch, self.patched_channels, prefix, "ch and out_channels x patch_size^2")


# Released YAML keys that we accept only with these values (other values select code paths we do not implement).
_OFFICIAL_FIXED = {
    "double_z": True,
    "pad_mode": "first",
    "new_shuffle": False,
    "spatial_interpolate": False,
    "temporal_interpolate": False,
    "resamp_with_conv": True,
}
# Released YAML keys without effect on the network.
_OFFICIAL_IGNORED = {"resolution", "attn_resolutions", "temporal_compress_times", "target", "in_channels_decoder"}


def _from_official_params(params: dict[str, Any], section: str) -> dict[str, Any]:
    params = dict(params.get("params", params))  # accept `{target, params}` or the bare params
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in _OFFICIAL_FIXED:
            if value != _OFFICIAL_FIXED[key]:
                raise ValueError(f"{section}.{key}={value!r} is not supported (only {_OFFICIAL_FIXED[key]!r})")
        elif key in _OFFICIAL_IGNORED:
            continue
        elif key == "out_ch":
            if section == "decoder_config":
                out["out_channels"] = value
        elif key == "in_channels":
            if section == "encoder_config":
                out["in_channels"] = value
        elif key == "temporal_upsample":
            out["temporal_downsample" if section == "encoder_config" else "temporal_upsample"] = tuple(value)
        elif key == "mid_attn":
            out["mid_attention"] = bool(value)
        elif key == "gradient_checkpoint":
            out["gradient_checkpointing"] = bool(value)
        elif key == "freeze_entire_encoder":
            if section == "encoder_config":
                out["frozen"] = bool(value)
        elif key == "ch_mult":
            out["ch_mult"] = tuple(value)
        elif key in ("ch", "num_res_blocks", "num_mid_blocks", "z_channels", "norm", "dropout"):
            out[key] = value
        else:
            raise ValueError(f"{section}.{key} is not a known released SSVAE parameter")
    return out


@dataclass
class SSVAEConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Per-channel latent statistics used by encode()/decode(); None = 0 and 1 (no normalisation).
    latent_mean: Optional[tuple[float, ...]] = None
    latent_std: Optional[tuple[float, ...]] = None

    @property
    def z_channels(self) -> int:
        return self.encoder.z_channels

    @property
    def spatial_compression(self) -> int:
        return self.encoder.patch_size * 2 ** (len(self.encoder.ch_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(t) for t in self.encoder.temporal_downsample)

    def validate(self, prefix: str = "") -> None:
        def key(name: str) -> str:
            return join_key(prefix, name)

        self.encoder.validate(key("encoder"))
        self.decoder.validate(key("decoder"))
        check(self.encoder.z_channels == self.decoder.z_channels, key("decoder.z_channels"),
              f"({self.decoder.z_channels}) must equal {key('encoder.z_channels')} ({self.encoder.z_channels})")
        check(sum(map(bool, self.encoder.temporal_downsample)) == sum(map(bool, self.decoder.temporal_upsample)),
              key("decoder.temporal_upsample"), f"must undo as many time halvings as {key('encoder.temporal_downsample')}")
        check(len(self.encoder.ch_mult) == len(self.decoder.ch_mult), key("decoder.ch_mult"),
              f"must have as many levels as {key('encoder.ch_mult')}")
        check(self.encoder.patch_size == self.decoder.patch_size, key("decoder.patch_size"),
              f"({self.decoder.patch_size}) must equal {key('encoder.patch_size')} ({self.encoder.patch_size})")
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            check(value is None or len(value) == self.z_channels, key(name),
                  f"needs {self.z_channels} values (one per latent channel), got {None if value is None else len(value)}")
        check(self.latent_std is None or all(s > 0 for s in self.latent_std), key("latent_std"),
              "values must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SSVAEConfig":
        """Inverse of to_dict(); unknown keys raise ValueError naming them."""

        def build(dc, values: dict[str, Any], prefix: str):
            names = {f.name for f in fields(dc)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {prefix} key(s): {unknown}")
            return dc(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        data = dict(data)
        enc = build(EncoderConfig, data.pop("encoder", {}), "encoder")
        dec = build(DecoderConfig, data.pop("decoder", {}), "decoder")
        cfg = build(cls, data, "SSVAEConfig")
        cfg.encoder, cfg.decoder = enc, dec
        cfg.validate()
        return cfg

    @classmethod
    def from_official(cls, config: dict[str, Any], **overrides: Any) -> "SSVAEConfig":
        """Build from the released YAML's `model.params` subset `{"encoder_config": ..., "decoder_config": ...}`."""
        missing = [k for k in ("encoder_config", "decoder_config") if k not in config]
        if missing:
            raise ValueError(f"official config lacks {missing}")
        enc = EncoderConfig(**_from_official_params(config["encoder_config"], "encoder_config"))
        dec = DecoderConfig(**_from_official_params(config["decoder_config"], "decoder_config"))
        cfg = cls(encoder=enc, decoder=dec, **overrides)
        cfg.validate()
        return cfg
