"""Write a diffusers ``AutoencoderKLSSVAE`` folder from one of our SSVAE folders or from the released checkpoint.

    python -m vae.convert_diffusers --ssvae runs/vae_tiny/model --out ssvae-diffusers
    python -m vae.convert_diffusers --official ssvae.ckpt --official-config released.yaml \\
        [--latent-stats ssvae_official_latent_stats.json] --out ssvae-diffusers

The released Lightning checkpoint is read weights-only (``torch.load(weights_only=True)``): no pickled code runs.
The folder then loads with ``AutoencoderKLSSVAE.from_pretrained(folder)``, or where our packages are not installed
with ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)``: it carries the model's code
(``vae.standalone``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vae.diffusers_model import AutoencoderKLSSVAE
from vae.model import SSVAE
from vae.official import load_official
from vae.standalone import make_self_contained


def convert(out: str | Path, ssvae: str | Path | None = None, official: str | Path | None = None,
            official_config: str | Path | dict | None = None, latent_stats: str | Path | None = None
            ) -> AutoencoderKLSSVAE:
    if (ssvae is None) == (official is None):
        raise ValueError("give exactly one of ssvae (one of our SSVAE folders) or official (the released checkpoint)")
    if ssvae is not None:
        model = SSVAE.from_pretrained(ssvae)
    else:
        if official_config is None:
            raise ValueError("official_config: the released YAML (encoder_config / decoder_config) is needed with "
                             "the released checkpoint")
        if not isinstance(official_config, dict):
            from omegaconf import OmegaConf

            path = Path(official_config)
            if not path.is_file():
                raise FileNotFoundError(f"official_config: {path} is not a file")
            official_config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            official_config = official_config.get("model", {}).get("params", official_config)
        model = load_official(official, official_config, latent_stats)
    converted = AutoencoderKLSSVAE.from_ssvae(model)
    converted.save_pretrained(str(out))
    make_self_contained(out)
    return converted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ssvae", help="one of our SSVAE folders (SSVAE.save_pretrained)")
    source.add_argument("--official", help="the released checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--official-config", help="the released YAML, with --official")
    parser.add_argument("--latent-stats", help="JSON {mean, std} of the released latents, with --official")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    convert(args.out, args.ssvae, args.official, args.official_config, args.latent_stats)
    print(f"wrote {args.out}: diffusers.AutoModel.from_pretrained({args.out!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
