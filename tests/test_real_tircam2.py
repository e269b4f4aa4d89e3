"""Real frames from the TIRCAM2 near-infrared camera (../shared/data/real/tircam2-ic310).

Their header oddities: no IMAGETYP, the filter in FILTER1, EXPTIME as a string, OBJECT='None'.
The masters are made here by combining the raw bias and flat frames.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import TIRCAM, real_set, run_cli

from imgproc.cli import EXIT_OK
from imgproc.naming import output_name


@pytest.fixture(scope="module", autouse=True)
def _tircam_present() -> None:
    real_set(TIRCAM.name)


#: sha256 of the raw files, from the data set's README.
CHECKSUMS = {
    "IC310_1.fits": "40cc4eb63007b377e59c2abd0362a95f4c325b40cce0c727fd291359cce30438",
    "bias_1.fits": "43cc86ce716c703ea6bf20f6441e26763ae9a840686d31d979a15f4999e296d5",
    "flats01.fits": "4ca65c20adb0b077bd953417ccfe655186c85b52ef79e381f3b1d3bf10e28f4a",
}


@pytest.fixture(scope="module")
def tircam_masters(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, Path, np.ndarray, np.ndarray]:
    """Lights folder (only the lights, linked) and master bias/flat folders made by median combining."""
    root = tmp_path_factory.mktemp("tircam")
    lights = root / "lights"
    lights.mkdir()
    for path in sorted(TIRCAM.glob("IC310_*.fits")):
        (lights / path.name).symlink_to(path)
    bias_frames = [fits.getdata(p).astype(np.float64) for p in sorted(TIRCAM.glob("bias_*.fits"))]
    bias = np.median(bias_frames, axis=0).astype(np.float32)
    flat_frames = [fits.getdata(p).astype(np.float64) - bias for p in sorted(TIRCAM.glob("flats*.fits"))]
    flat = np.median(flat_frames, axis=0).astype(np.float32)
    bias_dir, flat_dir = root / "bias", root / "flats"
    for folder, data, template in ((bias_dir, bias, "bias_1.fits"), (flat_dir, flat, "flats01.fits")):
        folder.mkdir()
        header = fits.getheader(TIRCAM / template)
        for key in ("BZERO", "BSCALE"):
            header.remove(key, ignore_missing=True)
        header["NCOMBINE"] = 3 if folder == bias_dir else 5  # a finished master says so
        fits.PrimaryHDU(data, header).writeto(folder / f"master_{template}")
    return lights, bias_dir, flat_dir, bias, flat


def test_tircam2_lights_calibrate_with_combined_masters(tircam_masters, tmp_path: Path) -> None:
    lights, bias_dir, flat_dir, bias, flat = tircam_masters
    out = tmp_path / "out"
    assert run_cli(lights, out, "-B", bias_dir, "-F", flat_dir) == EXIT_OK
    outputs = sorted(out.glob("*.fits"))
    assert len(outputs) == 5
    for light in sorted(TIRCAM.glob("IC310_*.fits")):
        raw_header = fits.getheader(light)
        mid = datetime.fromisoformat(raw_header["DATE-OBS"]) + timedelta(seconds=20)  # EXPTIME is '40'
        name = output_name(None, "DGAH", "J", mid)
        assert name.startswith("UNKNOWN_DGAH_J_20221023_")  # OBJECT='None' is a placeholder
        with fits.open(out / name) as hdul:
            header, data = hdul[0].header, hdul[0].data
        assert header["BIASCAL"] is True and header["FLATCAL"] is True and header["DARKCAL"] is False
        assert header["DATE-AVG"] == mid.isoformat(timespec="milliseconds")
        assert header["BIASFILE"] == "master_bias_1.fits" and header["FLATFILE"] == "master_flats01.fits"
        usable = flat > 0  # flat pixels <= 0 give NaN
        norm = np.where(usable, flat / flat[usable].astype(np.float64).mean(), np.nan)
        expected = (fits.getdata(light).astype(np.float64) - bias) / norm
        np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-2)


def test_tircam2_raw_files_are_untouched() -> None:
    for name, digest in CHECKSUMS.items():
        assert hashlib.sha256((TIRCAM / name).read_bytes()).hexdigest() == digest
