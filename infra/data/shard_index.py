"""Indexing WebDataset shards for random access.

Each shard ``<prefix>NNNNNN.tar`` is scanned once (tar headers only, no payload is read) to record where each member's
bytes lie; the records are joined with ``<prefix>NNNNNN.meta.jsonl``. A sample's files can then be read with one
``seek`` + ``read``, which is what lets a resumed run jump to any batch without decoding the batches before it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import split_roots
from .skips import (BAD_META, BAD_META_LINE, EMPTY_SHARD, META_WITHOUT_SAMPLE, MISSING_META, NO_MEDIA, NO_META_FILE,
                    UNREADABLE_SHARD, ZERO_FPS, SkipCounter)

logger = logging.getLogger("infra.data")

VIDEO_EXTS = ("mp4",)
IMAGE_EXTS = ("jpg", "jpeg", "png")
# The members a sample of ours may have; a name whose extension after the first dot is none of these but whose last
# suffix is one has dots in its key ("clip.v2.mp4" is key "clip.v2").
KNOWN_EXTS = VIDEO_EXTS + IMAGE_EXTS + ("txt", "id", "json")


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass
class SampleRecord:
    """One sample: where its files are and what its meta line says."""

    shard: str
    key: str
    kind: str  # "video" | "image"
    media_ext: str
    files: dict[str, Member]
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        """Frames the meta line promises (1 for images): ``floor(duration * fps)``, which real clips meet or exceed."""
        if self.kind != "video":
            return 1
        return int(math.floor(float(self.meta["duration"]) * float(self.meta["fps"]) + 1e-6))

    @property
    def aspect(self) -> float | None:
        """Width / height from the meta line, when it gives both."""
        try:
            w, h = float(self.meta["width"]), float(self.meta["height"])
        except (KeyError, TypeError, ValueError):
            return None
        return w / h if w > 0 and h > 0 else None


def find_shards(roots: str | list[str]) -> list[Path]:
    """Every ``.tar`` under the comma-separated roots (a root is a folder of shards or one tar), sorted per root."""
    paths: list[Path] = []
    for root in split_roots(roots) if isinstance(roots, str) else roots:
        p = Path(root).expanduser()
        if p.is_file():
            paths.append(p)
        elif p.is_dir():
            paths.extend(sorted(p.glob("*.tar")))
        else:
            raise FileNotFoundError(f"data root {root!r} is neither a folder nor a file")
    return paths


def meta_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + ".meta.jsonl")


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name; the rest is the extension.
    A key with dots of its own is kept whole when only the last suffix is a member type we know (``KNOWN_EXTS``)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    ext = ext.lower()
    if ext not in KNOWN_EXTS and "." in ext and ext.rpartition(".")[2] in KNOWN_EXTS:
        stem, _, ext = base.rpartition(".")
        ext = ext.lower()
    return (f"{directory}/{stem}" if directory else stem), ext


def read_meta(shard: Path, skips: SkipCounter | None = None) -> dict[str, dict]:
    """The shard's meta lines by key. A line that is not UTF-8, not JSON, not an object or without ``"key"`` is
    skipped and counted (``bad_meta_line``) under its file and line number; the rest of the file is still read."""
    path = meta_path(shard)
    if not path.exists():
        return {}
    skips = skips if skips is not None else SkipCounter()
    out = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where, shard_name = f"{path}:{number}", os.fspath(shard)
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                entry = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                skips.skip(BAD_META_LINE, where, repr(e)[:200], shard=shard_name, once=True)
                continue
            if not isinstance(entry, dict) or "key" not in entry:
                skips.skip(BAD_META_LINE, where, f"not a JSON object with a \"key\": {line[:80]!r}", shard=shard_name,
                           once=True)
                continue
            out[str(entry["key"])] = entry
    return out


def _scan_tar(shard: Path, skips: SkipCounter) -> dict[str, dict[str, Member]]:
    samples: dict[str, dict[str, Member]] = {}
    try:
        size = shard.stat().st_size
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = _split_name(info.name)
                    if info.offset_data + info.size > size:  # a truncated tar: the header is there, not the bytes
                        skips.skip(UNREADABLE_SHARD, f"{shard}:{info.name}",
                                   f"member ends at byte {info.offset_data + info.size}, the file at {size}",
                                   shard=os.fspath(shard), once=True)
                        samples.pop(key, None)
                        break
                    samples.setdefault(key, {})[ext] = Member(info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        # Keep what was indexed before the damage; the damaged tail is reported.
        skips.skip(UNREADABLE_SHARD, str(shard), repr(e), shard=os.fspath(shard), once=True)
    return samples


def _video_meta_problem(meta: dict | None) -> str | None:
    if meta is None:
        return MISSING_META
    try:
        fps = float(meta.get("fps") or 0)
    except (TypeError, ValueError):
        fps = 0.0
    if not fps > 0 or not math.isfinite(fps):
        return ZERO_FPS
    try:
        duration = float(meta["duration"])
    except (KeyError, TypeError, ValueError):
        return BAD_META
    return None if duration > 0 and math.isfinite(duration) else BAD_META


def index_shards(roots: str | list[str], kind: str, skips: SkipCounter) -> list[SampleRecord]:
    """The samples of the given kind (``"video"`` or ``"image"``) in the roots, in shard then tar order.

    Video samples without a usable meta line are skipped and counted: their duration and fps are what sampling needs.
    Image samples need no meta line (the caption comes from ``.txt``). Data that is not what it should be is counted
    under its shard's path and named: an empty tar, a video shard without its meta file, meta lines without a sample,
    samples without a video or image; a root with no shard at all is warned about.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
    records = []
    for root in split_roots(roots) if isinstance(roots, str) else roots:
        shards = find_shards([root])
        if not shards:
            logger.warning("data root %s holds no .tar shards", root)
        for shard in shards:
            records += _index_shard(shard, kind, exts, skips)
    return records


def _index_shard(shard: Path, kind: str, exts: tuple[str, ...], skips: SkipCounter) -> list[SampleRecord]:
    where = os.fspath(shard)
    if shard.stat().st_size == 0:
        skips.skip(EMPTY_SHARD, where, "an empty file", shard=where, once=True)
        return []
    metas = read_meta(shard, skips)
    samples = _scan_tar(shard, skips)
    if not samples and _tar_is_empty(shard):
        skips.skip(EMPTY_SHARD, where, "the tar holds no member", shard=where, once=True)
    for key in metas.keys() - samples.keys():
        skips.skip(META_WITHOUT_SAMPLE, f"{where}:{key}", f"a line of {meta_path(shard).name} names no member of "
                   f"the tar", shard=where, once=True)
    if kind == "video" and not meta_path(shard).exists() and any(
            any(e in files for e in exts) for files in samples.values()):
        skips.skip(NO_META_FILE, str(meta_path(shard)), "missing: the shard's videos have no duration or fps and "
                   "are skipped", shard=where, once=True)
    records = []
    for key, files in samples.items():
        media_ext = next((e for e in exts if e in files), None)
        if media_ext is None:
            if not any(e in files for e in VIDEO_EXTS + IMAGE_EXTS):
                skips.skip(NO_MEDIA, f"{where}:{key}", f"only {sorted(files)}", shard=where, once=True)
            continue  # another kind's sample: not ours, not bad input
        meta = metas.get(key)
        if kind == "video":
            problem = _video_meta_problem(meta)
            if problem is not None:
                skips.skip(problem, f"{where}:{key}", f"meta line {meta}", shard=where)
                continue
        records.append(SampleRecord(where, key, kind, media_ext, files, dict(meta or {})))
    return records


def _tar_is_empty(shard: Path) -> bool:
    try:
        with tarfile.open(shard, "r:") as tar:
            return tar.next() is None
    except (tarfile.TarError, OSError, EOFError):
        return False  # unreadable, which _scan_tar reports


class ShardReader:
    """Reads a sample's files by offset, keeping a few shard files open (one reader per worker process)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def read(self, record: SampleRecord, ext: str) -> bytes:
        member = record.files[ext]
        if self._pid != os.getpid():
            # A forked DataLoader worker inherits the parent's open files, whose read offset the processes would share;
            # forget them (without closing the parent's) and open our own.
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(record.shard)
        if f is None:
            if len(self._handles) >= self.max_open:
                self._handles.pop(next(iter(self._handles))).close()
            f = self._handles[record.shard] = open(record.shard, "rb")
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise EOFError(f"{record.shard}:{record.key}.{ext}: read {len(data)} of {member.size} bytes")
        return data

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __getstate__(self):
        # Open files do not cross process boundaries: each worker opens its own.
        return {"max_open": self.max_open, "_handles": {}, "_pid": None}
