"""Encode a shard data set once with the frozen first stage and text encoder, into a latent cache for DiT training.

    python -m tools.cache_latents --config configs/t2v/tiny.yaml --out data/latents/tiny [key=value ...]
    python -m dit.train --config configs/t2v/tiny.yaml latents.cache_dir=data/latents/tiny

    # or keyed by data, first stage and text encoder, so that every run on the same ones shares one cache
    python -m tools.cache_latents --config configs/t2v/tiny.yaml --root data/latents
    python -m dit.train --config configs/t2v/tiny.yaml latents.cache_root=data/latents [latents.sample=true]

The command line of ``dit.latent_cache.cache_latents`` (the format, writer and reader live there).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dit.latent_cache import CACHE_DTYPES, cache_latents, keyed_cache_dir
from infra.config import load_config


def main(argv: list[str] | None = None) -> Path:
    from dit.train_config import T2VTrainConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the t2v run YAML (data, first_stage, text_encoder)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="cache folder")
    where.add_argument("--root", help="folder of keyed caches (the one for this config: <root>/<cache_key>)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips encoded together")
    parser.add_argument("--dtype", default="float32", choices=CACHE_DTYPES, help="stored tensor dtype")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    args = parser.parse_args(argv)
    cfg = load_config(T2VTrainConfig, args.config, args.overrides)
    out = cache_latents(cfg, args.out or keyed_cache_dir(cfg, args.root, args.dtype), args.batch_size, args.dtype)
    print(out)
    return out


if __name__ == "__main__":
    main()
