"""Run an exported pipeline folder the way a user without our code would: our packages (vae, dit, infra, tools) are
made unimportable, diffusers loads the folder with its custom code, and the videos (and, with --lora, the videos
after ``load_lora_weights``) are saved as float tensors (``pt`` output, (B, T, 3, H, W) in [0, 1]) plus one mp4.

    python -I run_exported_pipeline.py FOLDER OUT.safetensors --prompt P [--prompt P ...] --seed S --steps N
        --guidance G [--lora LORA_FOLDER]
"""
import argparse
import importlib.abc
import sys

OURS = ("vae", "dit", "infra", "tools", "bench")


class BlockOurPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ImportError(f"{name} is ours and must not be needed to load an exported pipeline")
        return None


sys.meta_path.insert(0, BlockOurPackages())

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("out")
parser.add_argument("--prompt", action="append", required=True)
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--guidance", type=float, required=True)
parser.add_argument("--lora")
args = parser.parse_args()

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

pipe = DiffusionPipeline.from_pretrained(args.folder, trust_remote_code=True)
print("loaded", type(pipe).__name__, type(pipe.vae).__name__, type(pipe.transformer).__name__)
kwargs = dict(seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance)
tensors = {"videos": pipe(args.prompt, output_type="pt", **kwargs).frames.contiguous()}
if args.lora:
    pipe.load_lora_weights(args.lora)
    tensors["lora_videos"] = pipe(args.prompt, output_type="pt", **kwargs).frames.contiguous()
save_file(tensors, args.out)
frames = pipe(args.prompt[:1], output_type="np", **kwargs).frames[0]  # (T, H, W, 3) in [0, 1]
try:
    import av
except ImportError:  # PyAV is optional here: the tensors are the check, the mp4 is for a person to look at
    av = None
if av is not None:
    with av.open(args.out.replace(".safetensors", ".mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=int(pipe.config.fps))
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in (frames * 255).round().astype("uint8"):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
leaked = sorted(name for name in sys.modules if name.split(".")[0] in OURS)
assert not leaked, leaked
print("ok", tuple(tensors["videos"].shape))
