"""ssvae-stack: SSVAE video VAE + CogVideoX-style text-to-video DiT on one DeepSpeed ZeRO training infrastructure."""
import os

from setuptools import find_packages, setup

# torch is pinned to the version every test here ran with. GPU users who need another build (a CUDA wheel index,
# a newer release) override it: TORCH_REQUIREMENT="torch==2.13.0" pip install -e . --extra-index-url ...
TORCH = os.environ.get("TORCH_REQUIREMENT", "torch==2.13.0")

setup(
    name="ssvae-stack",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["infra", "infra.*", "vae", "vae.*", "dit", "dit.*", "tools", "tools.*", "bench"]),
    install_requires=[
        TORCH,
        "deepspeed==0.19.8",
        "transformers==5.24.0",
        "diffusers==0.42.1",
        "peft==0.21.2",  # LoRA fine-tuning of the DiT (dit/lora.py)
        "webdataset==1.0.2",
        "decord==0.6.0",
        "av==18.1.0",
        "omegaconf==2.4.0",
        "einops==0.8.2",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "scipy>=1.11",
        "pillow>=10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboard>=2.15",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "megatron": ["megatron-core==0.16.1"],
        "wandb": ["wandb"],
        "dev": ["pytest>=8", "pytest-xdist==3.8.0"],  # the suite runs on two workers (scripts/test.sh)
    },
    entry_points={
        "console_scripts": [
            "ssvae-train=vae.train:main",
            "t2v-train=dit.train:main",
            "ssvae-pipeline=tools.pipeline:main",
            "ssvae-study=tools.study:main",
            "ssvae-reconstruct=tools.reconstruct:main",
            "ssvae-pack-shards=tools.pack_shards:main",
            "ssvae-make-default-data=tools.make_default_data:main",
            "ssvae-latent-stats=tools.latent_stats:main",
            "ssvae-spectral=tools.spectral:main",
            "t2v-cache-latents=tools.cache_latents:main",
            "t2v-sample=tools.sample_t2v:main",
        ]
    },
)
