"""Tests for imgproc.cache.FileCache and the process caches built on it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from imgproc.cache import FileCache
from imgproc.publish import StackSettings, registrar_for


def _file(path: Path, size: int) -> str:
    path.write_bytes(b"x" * size)
    return str(path)


def test_value_is_made_once_per_file_version(tmp_path: Path) -> None:
    cache: FileCache[np.ndarray] = FileCache(1 << 20)
    path = _file(tmp_path / "a", 10)
    made: list[int] = []

    def make() -> np.ndarray:
        made.append(1)
        return np.zeros(len(made))

    first = cache.get("kind", path, make)
    assert cache.get("kind", path, make) is first and len(made) == 1
    assert cache.get("other kind", path, make) is not first and len(made) == 2
    _file(tmp_path / "a", 11)  # replaced: new size (and modification time)
    assert cache.get("kind", path, make) is not first and len(made) == 3
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same size
    assert len(cache.get("kind", path, make)) == 4


def test_a_value_over_the_budget_is_kept_until_the_next(tmp_path: Path) -> None:
    cache: FileCache[np.ndarray] = FileCache(10)
    paths = [_file(tmp_path / name, 1) for name in "ab"]
    big = cache.get(0, paths[0], lambda: np.zeros(1000, np.uint8))
    assert cache.get(0, paths[0], lambda: np.ones(1, np.uint8)) is big
    cache.get(0, paths[1], lambda: np.zeros(1000, np.uint8))
    assert cache.get(0, paths[0], lambda: np.ones(1, np.uint8))[0] == 1  # dropped, made again


def test_registrar_is_built_once_per_reference_intermediate(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    reference = tmp_path / "ref.fits"
    fits.PrimaryHDU(rng.normal(100, 5, (64, 64)).astype(np.float32)).writeto(reference)
    settings = StackSettings(align=True)
    first = registrar_for(reference, settings)
    assert registrar_for(reference, settings) is first
    assert registrar_for(reference, StackSettings(align=True, upsample=10)) is not first
    fits.PrimaryHDU(rng.normal(100, 5, (64, 64)).astype(np.float32)).writeto(reference, overwrite=True)
    os.utime(reference, ns=(0, os.stat(reference).st_mtime_ns + 10**9))
    assert registrar_for(reference, settings) is not first
