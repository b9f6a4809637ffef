"""Writing WebDataset shards in the SSVAE reference layout.

A shard is ``<prefix>NNNNNN.tar`` holding samples ``<key>.mp4`` (or ``.jpg``/``.png``), ``<key>.id`` and an optional
``<key>.txt`` caption, next to ``<prefix>NNNNNN.meta.jsonl`` whose lines describe each sample (``key``, ``duration``,
``fps``, ``width``, ``height``, optional ``caption`` and any extra fields such as a generator's ground truth).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np


def encode_image(image: np.ndarray, fmt: str = "jpg") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


class ShardWriter:
    """Writes samples into numbered shards of at most ``max_samples`` each.

    Each shard is written to a temporary name and renamed when complete, so a crash never leaves a half-written shard
    that a reader would take for a good one.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "", max_samples: int = 1000, start_index: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples = prefix, max_samples
        self.index = start_index
        self._tar = None
        self._meta: list[dict] = []
        self.paths: list[Path] = []

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}{index:06d}.tar"

    def write(self, key: str, files: dict[str, bytes], meta: dict) -> None:
        """Add one sample. ``files`` maps extensions (``mp4``, ``jpg``, ``txt``) to bytes; ``.id`` is added."""
        if "/" in key or "." in key:
            raise ValueError(f"sample key {key!r} must not contain '/' or '.'")
        if self._tar is None:
            self._open()
        members = dict(files)
        members.setdefault("id", key.encode())
        for ext, data in members.items():
            if isinstance(data, str):
                data = data.encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), 0  # a fixed mtime: the same samples give byte-identical shards
            self._tar.addfile(info, io.BytesIO(data))
        self._meta.append({"key": key, **meta})
        if len(self._meta) >= self.max_samples:
            self._close_shard()

    def _open(self) -> None:
        self._tmp = self.shard_path(self.index).with_suffix(".tar.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._meta = []

    def _close_shard(self) -> None:
        self._tar.close()
        final = self.shard_path(self.index)
        meta_tmp = final.with_suffix(".meta.jsonl.tmp")
        meta_tmp.write_text("".join(json.dumps(m) + "\n" for m in self._meta))
        os.replace(meta_tmp, final.with_suffix(".meta.jsonl"))
        os.replace(self._tmp, final)
        self.paths.append(final)
        self._tar, self.index = None, self.index + 1

    def close(self) -> list[Path]:
        if self._tar is not None:
            self._close_shard()
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
