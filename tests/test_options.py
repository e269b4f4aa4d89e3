"""Command-line options: any order, --set and --config overrides, --object, the observer kept."""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from astropy.io import fits
from conftest import master_flags, run_cli

from imgproc.calibrate import LightSettings, calibrated_header
from imgproc.cli import EXIT_OK, EXIT_USAGE, build_parser
from imgproc.overrides import OverrideError, apply_overrides, take_snakemake_config
from imgproc.provenance import provenance_cards
from imgproc.publish import StackSettings, combine_cards
from imgproc.synth import NightSpec, make_night


def test_options_and_folders_in_any_order() -> None:
    args = build_parser().parse_intermixed_args(
        ["lights", "-a", "out", "-S", "20", "--set", "workers=threads"]
    )
    assert (args.input_dir, args.output_dir, args.align, args.stack_threshold) == (
        Path("lights"),
        Path("out"),
        True,
        20,
    )
    assert args.overrides == ["workers=threads"]


def test_help_explains_the_stack_threshold_with_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "-s -S 20 makes a 300-frame sequence 20 stacks of 15 frames" in text


def test_overrides_reach_nested_keys_and_are_checked() -> None:
    config = yaml.safe_load((Path(__file__).parent.parent / "config.yaml").read_text())
    changed = apply_overrides(
        config, ["stacking.method=median", "alignment={reference: middle}", "batches=4"]
    )
    assert changed["stacking"]["method"] == "median" and changed["stacking"]["sigma_low"] == 3.0
    assert changed["alignment"]["reference"] == "middle" and changed["alignment"]["upsample"] == 20
    assert changed["batches"] == 4 and config["stacking"]["method"] == "sigclip"  # a copy
    for bad, why in [
        ("stacking.methd=median", "stacking has no key 'methd'"),
        ("observer=X", "observer is set by -o"),
        ("stacking.method", "is not KEY=VALUE"),
    ]:
        with pytest.raises(OverrideError, match=why):
            apply_overrides(config, [bad])
    assert take_snakemake_config(["--config", "a=1", "b.c=2", "--dry-run", "x=1"]) == (
        ["a=1", "b.c=2"],
        ["--dry-run", "x=1"],
    )


def test_set_and_config_overrides_are_written_into_imgproc_yaml_and_the_stack_header(
    night, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = [night.root / "lights", "-s", "-S", "2", *master_flags(night), out]  # OUTPUT_DIR last
    status = run_cli(*args, "--set", "stacking.sigma_high=2.5", "--", "--config", "stacking={method: median}")
    assert status == EXIT_OK
    config = yaml.safe_load((out / "imgproc.yaml").read_text())
    assert config["stacking"]["method"] == "median" and config["stacking"]["sigma_high"] == 2.5
    stack = fits.getheader(next(out.glob("*.fits")))
    assert stack["NCOMBINE"] == 2 and stack["STACKMTH"] == "median" and stack["STACKREJ"] == "none"
    assert stack["STACKNRM"] == "none"
    assert run_cli(*args, "--set", "stacking.sigma_high=2.5") == EXIT_OK  # sigclip again
    stack = fits.getheader(next(out.glob("*.fits")))
    assert stack["STACKMTH"] == "sigclip" and stack["STACKREJ"] == "sigma 3 low 2.5 high"
    capsys.readouterr()
    assert run_cli(*args, "--set", "stacking.method=medain") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "config stacking.method: 'medain' is not one of" in err and len(err.strip().splitlines()) == 1


def test_new_cards_fit_without_truncation() -> None:
    """The cards imgproc adds keep their comments whole (astropy would warn, and the console show it)."""
    settings = StackSettings(sigma_low=2.5, sigma_high=12.25)
    header = fits.Header([("OBSERVER", "O" * 68)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = calibrated_header(
            header, {},
            LightSettings("X", datetime(2025, 5, 1), 1.0, object_name="N" * 68,
                          cards=provenance_cards("f" * 40, ["/a.fits"])),
        )  # fmt: skip
        for key, value, comment in combine_cards(settings):
            out.set(key, value, comment)
        text = out.tostring()
    assert out["ORIGOBS"] == "O" * 68 and out["STACKREJ"] == "sigma 2.5 low 12.25 high"
    assert "imgproc inputs+settings" in text and "about the median, std, 1 pass" in text


def test_object_names_lights_without_one_and_the_cameras_observer_is_kept(tmp_path: Path, capsys) -> None:
    night = make_night(tmp_path / "night", NightSpec(n_lights=2, shape=(48, 70), n_stars=10, filters=("J",)))
    for light in night.lights[1:]:
        with fits.open(light, mode="update") as hdul:
            del hdul[0].header["OBJECT"]
    out = tmp_path / "out"
    assert (
        run_cli(night.root / "lights", out, "--object", "IC 310", *master_flags(night), "--plan") == EXIT_OK
    )
    assert "1 lights without OBJECT named 'IC 310' (--object)" in (out / "plan.txt").read_text()
    assert (
        run_cli(night.root / "lights", out, "--object", "IC 310", "-o", "ME", *master_flags(night)) == EXIT_OK
    )
    headers = {p.name: fits.getheader(p) for p in out.glob("*.fits")}
    by_object = {h["OBJECT"]: h for h in headers.values()}
    assert set(by_object) == {"V1234 Cyg", "IC 310"}  # the header's own OBJECT wins
    assert any(name.startswith("IC_310_ME_J_") for name in headers)
    for header in headers.values():
        assert header["OBSERVER"] == "ME" and header["ORIGOBS"] == "Test Observer"
