"""Baselines the benchmark measures imgproc against, each run as its own process.

``reference``: the lean way. Plain numpy in a ``multiprocessing.Pool(cores)``; the masters are
read once per worker (pool initializer, flats normalised there); each light is read with astropy,
calibrated in float32 as ``(light - bias - dark) / (flat / mean(flat))`` (flat pixels <= 0 or
non-finite are NaN) and written as a float32 FITS file.

``ccdproc``: the straightforward way of the original script: ``CCDData.read`` per light,
``ccdproc.subtract_bias`` / ``subtract_dark(exposure_time='EXPTIME', exposure_unit=u.s)`` /
``flat_correct``, ``CCDData.write``, in a ``multiprocessing.Pool(cores)`` with the masters read
once per worker.

``--binning N`` (reference only, like ``imgproc -b N``) bins each calibrated light with
:func:`imgproc.binning.bin_image` (and :func:`~imgproc.binning.bin_header`) before anything else.

``--align`` without stack mode (reference only, like ``imgproc -a``): each light is registered
on the first light of its filter and resampled as below, and written alone.

``--mode stack --align`` (like ``imgproc -s -S T -a``): each pool task is one group of ``round(n/T)``
consecutive lights of a filter (:func:`stack_groups`, the original tool's rule), calibrated in
memory (the method's own way), then:

- reference: registered on the first light of their filter with
  :class:`imgproc.align.Registrar` (``try_flip=True``; frames it does not accept are left out,
  as imgproc does), resampled with :func:`imgproc.align.apply_shift` and combined with
  :func:`imgproc.stack.combine`, all with imgproc's settings from the repository's config.yaml
  (:func:`stack_settings`): the same algorithms, without a workflow around them;
- ccdproc: the original script's tools: ``skimage.registration.phase_cross_correlation``
  (``upsample_factor=20``) against the first light of the filter, ``scipy.ndimage.shift``
  (cubic, NaN outside the frame, masked) and ``ccdproc.combine`` (median, 3-sigma clipping).

``--mode stack`` without ``--align`` (reference only, like ``imgproc -s``): the group's lights are
combined as they are. No intermediate files.

Usage: ``python bench/baselines.py {reference,ccdproc} NIGHT_JSON OUT --mode {calibrate,stack}
[--align] [--binning N] --cores N [--threshold 20]``. ``OUT/groups.json`` maps every output file
to its lights.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

REPO = Path(__file__).resolve().parent.parent

_DROP = ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM")

# Per-worker state, filled by the pool initializers.
_MASTERS: dict[str, Any] = {}
_REGISTRARS: dict[str, Any] = {}
_REFERENCE_DATA: dict[str, np.ndarray] = {}
_REFERENCES: dict[str, dict[str, str]] = {}
_SETTINGS: dict[str, Any] = {}
_BINNING: list[int] = [1]


def stack_settings() -> dict[str, Any]:
    """imgproc's alignment and stacking settings from the repository's config.yaml, as the
    workflow passes them to its publish jobs (so a change of imgproc's defaults follows)."""
    if not _SETTINGS:
        import yaml

        from imgproc.dag import Layout

        config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
        _SETTINGS.update(Layout({**config, "align": True}).stack_params())
    return _SETTINGS


# --- night description -----------------------------------------------------------------------


def load_night(night_json: Path) -> dict[str, Any]:
    """The night description written by run.py: folder, lights (time order) and masters."""
    return json.loads(night_json.read_text(encoding="utf-8"))


def master_paths(night: dict[str, Any]) -> dict[str, str]:
    """Every master file the lights use, by file name -> path (flats are in ``flats/``)."""
    root = Path(night["root"])
    folders = {"bias": "bias", "dark": "darks", "flat": "flats"}
    paths: dict[str, str] = {}
    for light in night["lights"]:
        for role, folder in folders.items():
            paths[light[role]] = str(root / folder / light[role])
    return paths


def is_flat(path: str) -> bool:
    return Path(path).parent.name == "flats"


# --- the lean reference ----------------------------------------------------------------------


def normalise_flat(flat: np.ndarray) -> np.ndarray:
    """Flat / mean over positive finite pixels, float32; other pixels NaN."""
    usable = np.isfinite(flat) & (flat > 0)
    out = np.where(usable, flat, np.nan).astype(np.float32)
    mean = float(np.mean(out[usable], dtype=np.float64))
    if abs(mean - 1.0) > 1e-6:
        out /= np.float32(mean)
    return out


def init_reference(masters: dict[str, str], references: dict[str, dict[str, str]], binning: int = 1) -> None:
    """Pool initializer: read every master once (native float32), flats normalised; lights are
    binned by ``binning`` once calibrated."""
    warnings.simplefilter("ignore")
    _REFERENCES.update(references)
    _BINNING[0] = binning
    for name, path in masters.items():
        data = np.asarray(fits.getdata(path), dtype=np.float32)
        _MASTERS[name] = normalise_flat(data) if is_flat(path) else data


def calibrate_reference(path: str, light: dict[str, str]) -> tuple[np.ndarray, fits.Header]:
    """Read a light with astropy and calibrate it in float32 (binned with imgproc's functions
    when the pool bins)."""
    with fits.open(path, memmap=False) as hdul:
        data = np.array(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
    np.subtract(data, _MASTERS[light["bias"]], out=data)
    np.subtract(data, _MASTERS[light["dark"]], out=data)
    np.divide(data, _MASTERS[light["flat"]], out=data)
    if _BINNING[0] > 1:
        from imgproc.binning import bin_header, bin_image

        return bin_image(data, _BINNING[0]), bin_header(header, _BINNING[0])
    return data, header


def write_float32(path: Path, data: np.ndarray, header: fits.Header) -> None:
    for key in _DROP:
        header.remove(key, ignore_missing=True, remove_all=True)
    fits.PrimaryHDU(data=np.asarray(data, dtype=np.float32), header=header).writeto(path, overwrite=True)


# --- the ccdproc way -------------------------------------------------------------------------


def init_ccdproc(masters: dict[str, str], references: dict[str, dict[str, str]], binning: int = 1) -> None:
    """Pool initializer: every master read once as CCDData."""
    from astropy.nddata import CCDData

    warnings.simplefilter("ignore")
    _REFERENCES.update(references)
    for name, path in masters.items():
        _MASTERS[name] = CCDData.read(path, unit="adu")


def calibrate_ccdproc(path: str, light: dict[str, str]) -> Any:
    """CCDData.read + subtract_bias + subtract_dark + flat_correct, as the original script."""
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData

    ccd = CCDData.read(path, unit="adu")
    ccd = ccdproc.subtract_bias(ccd, _MASTERS[light["bias"]])
    ccd = ccdproc.subtract_dark(ccd, _MASTERS[light["dark"]], exposure_time="EXPTIME", exposure_unit=u.s)
    return ccdproc.flat_correct(ccd, _MASTERS[light["flat"]])


# --- tasks -----------------------------------------------------------------------------------


def task_calibrate(job: tuple[str, str, dict[str, str], str]) -> None:
    """One light: calibrate and write (the method decides how)."""
    method, path, light, target = job
    if method == "reference":
        data, header = calibrate_reference(path, light)
        write_float32(Path(target), data, header)
    else:
        calibrate_ccdproc(path, light).write(target, overwrite=True)


def task_align(job: tuple[str, str, dict[str, str], str]) -> dict[str, Any]:
    """One light (reference only): calibrate, register on the first light of its filter and
    resample (:func:`aligned`); write it unless the registrar does not accept it."""
    _, path, light, target = job
    data, header = calibrate_reference(path, light)
    frame = aligned(registrar(light["filter"]), data)
    if frame is None:
        return {"excluded": [light["name"]]}
    write_float32(Path(target), frame, header)
    return {"excluded": []}


def aligned(reg: Any, data: np.ndarray) -> np.ndarray | None:
    """``data`` registered by ``reg`` (``try_flip=True``) and resampled with
    :func:`imgproc.align.apply_shift`; None when the registrar does not accept it."""
    from dataclasses import replace

    from imgproc.align import apply_shift

    shift = reg.measure(data, try_flip=True)
    if not reg.accepts(shift):
        return None
    if shift.flipped:
        data = np.rot90(data, 2).copy()
    return apply_shift(data, replace(shift, flipped=False), kernel=stack_settings()["kernel"])


def registrar(filt: str) -> Any:
    """The Registrar of a filter's reference light, built once per worker."""
    import inspect

    from imgproc.align import Registrar

    if filt not in _REGISTRARS:
        ref = _REFERENCES[filt]
        data, _ = calibrate_reference(ref["path"], ref)
        accepted = inspect.signature(Registrar).parameters
        # "reference" is the workflow's choice of reference frame, not the Registrar's argument
        options = {k: v for k, v in stack_settings().items() if k in accepted and k != "reference"}
        _REGISTRARS[filt] = Registrar(data, **options)
    return _REGISTRARS[filt]


def stack_ccdproc(filt: str, members: list[tuple[str, dict[str, str]]], target: str) -> dict[str, Any]:
    """One group the original script's way: ccdproc calibration, scikit-image phase correlation
    (upsampled 20x), cubic scipy shift and ``ccdproc.combine`` (median, 3-sigma clipping)."""
    import ccdproc
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    if filt not in _REFERENCE_DATA:
        ref = _REFERENCES[filt]
        _REFERENCE_DATA[filt] = np.asarray(calibrate_ccdproc(ref["path"], ref).data)
    reference = _REFERENCE_DATA[filt]
    frames = []
    for path, light in members:
        ccd = calibrate_ccdproc(path, light)
        shift, _, _ = phase_cross_correlation(reference, np.asarray(ccd.data), upsample_factor=20)
        ccd.data = ndimage.shift(np.asarray(ccd.data), shift, order=3, mode="constant", cval=np.nan)
        ccd.mask = np.isnan(ccd.data)
        frames.append(ccd)
    stacked = ccdproc.combine(
        frames, method="median", sigma_clip=True, sigma_clip_low_thresh=3, sigma_clip_high_thresh=3
    )
    stacked.meta["NCOMBINE"] = len(frames)
    stacked.write(target, overwrite=True)
    return {"excluded": []}


def task_stack(job: tuple[str, str, bool, list[tuple[str, dict[str, str]]], str]) -> dict[str, Any]:
    """One group: calibrate in memory, register and resample (``align``), combine; write the stack."""
    from imgproc.stack import ArraySource, combine

    method, filt, align, members, target = job
    if method == "ccdproc":
        return stack_ccdproc(filt, members, target)
    reg = registrar(filt) if align else None
    settings = stack_settings()
    frames, header, excluded = [], None, []
    for path, light in members:
        data, head = calibrate_reference(path, light)
        frame = data if reg is None else aligned(reg, data)
        if frame is None:
            excluded.append(light["name"])
            continue
        header = header if header is not None else head
        frames.append(frame)
    if not frames:
        return {"excluded": excluded}
    if len(frames) == 1:
        result = frames[0]
    else:
        sources = [ArraySource(frame) for frame in frames]
        result = combine(
            sources,
            method=settings["method"],
            sigma_low=settings["sigma_low"],
            sigma_high=settings["sigma_high"],
            memory_budget=settings["memory_budget"],
        )
    assert header is not None
    header["NCOMBINE"] = len(frames)
    write_float32(Path(target), result, header)
    return {"excluded": excluded}


def stack_groups(n_frames: int, threshold: int) -> list[list[int]]:
    """The original tool's rule: more than ``threshold`` frames are grouped k = round(n/threshold)
    consecutive frames at a time (the last group may be smaller); otherwise every frame alone."""
    k = round(n_frames / threshold) if n_frames > threshold else 1
    return [list(range(start, min(start + k, n_frames))) for start in range(0, n_frames, k)]


# --- driver ----------------------------------------------------------------------------------


def run(
    method: str,
    night: dict[str, Any],
    out: Path,
    mode: str,
    cores: int,
    threshold: int,
    align: bool = False,
    binning: int = 1,
) -> dict:
    """Process the night into ``out``; returns {output name: [light names]} and exclusions."""
    if method == "ccdproc" and (binning > 1 or align != (mode == "stack")):
        raise SystemExit("the ccdproc baseline calibrates, or stacks with --align; it does not bin")
    out.mkdir(parents=True, exist_ok=True)
    light_dir = Path(night["root"]) / "lights"
    lights = night["lights"]
    init = init_reference if method == "reference" else init_ccdproc
    groups: dict[str, list[str]] = {}
    by_filter: dict[str, list[dict[str, str]]] = {}
    for light in lights:
        by_filter.setdefault(light["filter"], []).append(light)
    references = {
        filt: {**seq[0], "path": str(light_dir / seq[0]["name"])} for filt, seq in by_filter.items()
    }
    if mode == "calibrate":
        jobs: list[Any] = []
        for light in lights:
            name = Path(light["name"]).stem + ".fits"
            groups[name] = [light["name"]]
            jobs.append((method, str(light_dir / light["name"]), light, str(out / name)))
        task: Any = task_align if align else task_calibrate
    else:
        jobs = []
        for filt, seq in sorted(by_filter.items()):
            for index, members in enumerate(stack_groups(len(seq), threshold)):
                name = f"stack_{filt}_{index:04d}.fits"
                group = [seq[i] for i in members]
                groups[name] = [g["name"] for g in group]
                files = [(str(light_dir / g["name"]), g) for g in group]
                jobs.append((method, filt, align, files, str(out / name)))
        task = task_stack
    excluded: list[str] = []
    pool = multiprocessing.Pool(cores, initializer=init, initargs=(master_paths(night), references, binning))
    try:
        for result in pool.imap_unordered(task, jobs, chunksize=1):
            if result:
                excluded += result["excluded"]
    finally:
        pool.close()
        pool.join()
    info = {"method": method, "mode": mode, "groups": groups, "excluded": sorted(excluded)}
    (out / "groups.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("reference", "ccdproc"))
    parser.add_argument("night_json", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=("calibrate", "stack"), default="calibrate")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--threshold", type=int, default=20)
    parser.add_argument("--align", action="store_true", help="register and resample (imgproc -a)")
    parser.add_argument("--binning", type=int, default=1, help="bin the calibrated lights (imgproc -b)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    night = load_night(args.night_json)
    run(args.method, night, args.out, args.mode, args.cores, args.threshold, args.align, args.binning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
