"""Shared fixtures: small generated nights and a way to run the imgproc command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgproc.cli import main as imgproc_main
from imgproc.synth import Night, NightSpec, make_night

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
TIRCAM = REAL / "tircam2-ic310"
#: CI sets IMGPROC_REQUIRE_REAL=1: there a missing real data set fails its tests instead of
#: skipping them (a user's clone has no ../shared, and skips).
REQUIRE_REAL = os.environ.get("IMGPROC_REQUIRE_REAL") == "1"

SMALL = NightSpec(n_lights=4, shape=(64, 64), n_stars=25, dither_px=2.0)


@pytest.fixture(scope="session")
def small_night_template(tmp_path_factory: pytest.TempPathFactory) -> Night:
    """A small night made once per session (copy it before changing it)."""
    return make_night(tmp_path_factory.mktemp("night"), SMALL)


@pytest.fixture
def night(small_night_template: Night, tmp_path: Path) -> Night:
    """A private copy of the small night, free to modify."""
    root = tmp_path / "night"
    shutil.copytree(small_night_template.root, root)
    src = small_night_template
    return Night(
        root=root,
        lights=[root / "lights" / p.name for p in src.lights],
        bias_dir=root / "bias",
        dark_dir=root / "darks",
        flat_dir=root / "flats",
        shifts=src.shifts,
        expected_masters=src.expected_masters,
        truth=src.truth,
    )


def real_set(name: str) -> Path:
    """The folder of the shared real data set ``name``; skips the test where it is absent (a
    user's clone), fails it under ``IMGPROC_REQUIRE_REAL=1`` (CI)."""
    folder = REAL / name
    if not folder.is_dir():
        if REQUIRE_REAL:
            pytest.fail(f"IMGPROC_REQUIRE_REAL=1 but the real data set {folder} is missing", pytrace=False)
        pytest.skip(f"real data not present at {folder}")
    return folder


def fitsverify_errors(path: Path) -> str:
    """fitsverify's report of ``path`` when it finds an error, else ``""``. Skips the test where
    fitsverify is not installed, except under CI=true (.ci/run installs it)."""
    if shutil.which("fitsverify") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but fitsverify is not installed", pytrace=False)
        pytest.skip("fitsverify is not installed (Debian: apt-get install -y fitsverify)")
    result = subprocess.run(["fitsverify", "-q", "-e", str(path)], capture_output=True, text=True)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def master_flags(night: Night) -> list[str]:
    """-B/-D/-F for a night's master folders."""
    return ["-B", str(night.bias_dir), "-D", str(night.dark_dir), "-F", str(night.flat_dir)]


def run_cli(*args: str | Path) -> int:
    """Run the imgproc command in-process; returns its exit status."""
    return imgproc_main([str(a) for a in args])


def run_cli_process(
    *args: str | Path, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python imgproc.py ...`` (the source-checkout entry point) as a subprocess."""
    return subprocess.run(
        [sys.executable, str(REPO / "imgproc.py"), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def sha256_tree(folder: Path, pattern: str = "*.fits") -> dict[str, str]:
    """Digest of every matching file directly in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def reference_light(out: Path, output: str | None = None) -> Path:
    """The raw light that an aligned output of the run in ``out`` (any, or the one named
    ``output``) was registered to, from the publish receipts."""
    for receipt in sorted((out / "work" / "published").glob("*.json")):
        for name, item in json.loads(receipt.read_text())["items"].items():
            if item.get("reference") and output in (None, name):
                cal = json.loads((out / "work" / "cal" / f"{item['reference']}.json").read_text())
                return Path(cal["source"])
    raise AssertionError(f"no aligned output in {out}")
