"""The demo (`make demo`): the one larger end-to-end run of the suite (256 px, 24 lights, twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from astropy.io import fits

from imgproc.demo import DEMO_SPEC, run


@pytest.mark.e2e
def test_demo_reduces_the_generated_night_twice(tmp_path: Path, capsys) -> None:
    assert run(tmp_path) == 0
    lights = DEMO_SPEC.n_lights * len(DEMO_SPEC.filters)
    calibrated = sorted((tmp_path / "calibrated").glob("*.fits"))
    stacked = sorted((tmp_path / "stacked").glob("*.fits"))
    assert len(calibrated) == lights
    assert len(stacked) == 2 * 4  # 12 frames per filter, -S 4: groups of 3 -> 4 stacks per filter
    assert all(fits.getheader(p)["NCOMBINE"] == 3 for p in stacked)
    assert all(fits.getheader(p)["BIASFILE"] == "bias_g120.fits" for p in calibrated)  # not a distractor
    for folder in ("calibrated", "stacked"):
        assert json.loads((tmp_path / folder / "summary.json").read_text())["complete"]
        assert (tmp_path / folder / "report.html").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert f"{lights} outputs in {(tmp_path / 'calibrated').resolve()}" in printed
