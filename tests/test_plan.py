"""Tests for the plan (imgproc.plan) on manifest rows from a real scan of a synthetic night."""

from __future__ import annotations

import math
import shutil
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.time import Time

from imgproc.manifest import OK, SKIPPED
from imgproc.plan import PlanSettings, format_plan, make_plan, stack_groups
from imgproc.scan import ScanRequest, scan
from imgproc.synth import Night, NightSpec, make_night

SPEC = NightSpec(n_lights=4, shape=(64, 64))


def _scan(night: Night, roles: tuple[str, ...] = ("bias", "dark", "flat")) -> list[dict]:
    folders = {"bias": night.bias_dir, "dark": night.dark_dir, "flat": night.flat_dir}
    return scan(ScanRequest(night.root / "lights", {role: folders[role] for role in roles}))


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Night:
    return make_night(tmp_path_factory.mktemp("night"), SPEC)


@pytest.fixture(scope="module")
def rows(night) -> list[dict]:
    return _scan(night)


@pytest.fixture
def own_night(tmp_path) -> Night:
    """A night this test may change."""
    return make_night(tmp_path, SPEC)


def _name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def _mid(night: Night, light: str) -> datetime:
    return datetime.fromisoformat(night.truth["date_obs"][light]) + timedelta(seconds=SPEC.exptime / 2)


def _expected_name(filt: str, mid: datetime, observer: str = "DGAH") -> str:
    jd = Time(mid, scale="utc").jd
    return f"V1234_Cyg_{observer}_{filt}_{mid:%Y%m%d}_{jd:.8f}.fits"


def test_make_plan_each_light_gets_expected_masters(night, rows):
    plan = make_plan(rows, PlanSettings())
    assert len(plan) == len(night.lights) == 2 * SPEC.n_lights
    got = {
        _name(entry["path"]): {role: _name(entry[role]) for role in ("bias", "dark", "flat")}
        for entry in plan
    }
    assert got == night.expected_masters
    assert all(entry["status"] == OK and entry["reason"] == "" for entry in plan)


def test_make_plan_never_chooses_distractors(night, rows):
    distractors = {name for name, info in night.truth["masters"].items() if info["role"] == "distractor"}
    assert len(distractors) >= 6
    chosen = {
        _name(entry[role]) for entry in make_plan(rows, PlanSettings()) for role in ("bias", "dark", "flat")
    }
    assert chosen.isdisjoint(distractors)
    assert chosen == {"bias_g120.fits", "dark_60s.fits", "flat_V.fits", "flat_R.fits"}


def test_make_plan_single_outputs_named_from_mid_exposure(night, rows):
    plan = make_plan(rows, PlanSettings(observer="ABC"))
    for entry in plan:
        light = _name(entry["path"])
        mid = _mid(night, light)
        assert entry["mid"] == mid.isoformat(timespec="microseconds")
        assert entry["output"] == _expected_name(night.truth["filter"][light], mid, "ABC")
        assert entry["n_group"] == 1
        assert entry["sequence"] == f"V1234_Cyg_{night.truth['filter'][light]}_60s_1x1"
    assert len({entry["output"] for entry in plan}) == len(plan)
    assert [entry["mid"] for entry in plan] == sorted(entry["mid"] for entry in plan)


def test_make_plan_frame_ids_unique_and_safe(rows):
    plan = make_plan(rows, PlanSettings())
    ids = [entry["frame_id"] for entry in plan]
    assert len(set(ids)) == len(ids)
    assert all("/" not in fid and not fid.startswith(".") for fid in ids)


def test_make_plan_ignores_non_light_rows(night, rows):
    plan = make_plan(rows, PlanSettings())
    assert {_name(entry["path"]) for entry in plan} == {path.name for path in night.lights}


@pytest.mark.parametrize(
    ("n", "threshold", "k", "n_groups", "last_size"),
    [
        (0, 150, 1, 0, None),
        (1, 150, 1, 1, 1),
        (10, 150, 1, 10, 1),
        (150, 150, 1, 150, 1),
        (151, 150, 1, 151, 1),  # round(151/150) = 1: still singles
        (224, 150, 1, 224, 1),  # round(1.49) = 1
        (226, 150, 2, 113, 2),  # round(1.51) = 2
        (300, 150, 2, 150, 2),
        (301, 150, 2, 151, 1),
        (360, 150, 2, 180, 2),  # round(2.4) = 2: 180 pairs, none smaller
        (451, 150, 3, 151, 1),
        (500, 150, 3, 167, 2),  # round(3.33) = 3: 166 triples + a pair
        (4, 2, 2, 2, 2),
        (5, 2, 2, 3, 1),  # round(2.5) = 2 in Python
        (7, 2, 4, 2, 3),  # round(3.5) = 4 in Python
    ],
)
def test_stack_groups_counts(n, threshold, k, n_groups, last_size):
    assert k == (round(n / threshold) if n > threshold else 1)
    groups = stack_groups(n, threshold)
    assert len(groups) == n_groups
    assert [i for group in groups for i in group] == list(range(n))
    assert all(len(group) == k for group in groups[:-1])
    if groups:
        assert len(groups[-1]) == last_size
        assert all(group == list(range(group[0], group[0] + len(group))) for group in groups)


def test_make_plan_stacked_groups_share_output_names(night, rows):
    plan = make_plan(rows, PlanSettings(stack=True, stack_threshold=2))  # 4 per filter -> k = 2
    by_output: dict[str, list[dict]] = defaultdict(list)
    for entry in plan:
        assert entry["status"] == OK
        by_output[entry["output"]].append(entry)
    assert len(by_output) == 4
    for output, members in by_output.items():
        assert len(members) == 2
        assert all(entry["n_group"] == 2 for entry in members)
        names = sorted(_name(entry["path"]) for entry in members)
        filters = {night.truth["filter"][name] for name in names}
        assert len(filters) == 1
        mids = [_mid(night, name) for name in names]
        mean = mids[0] + (mids[1] - mids[0]) / 2
        assert output == _expected_name(filters.pop(), mean)
    # consecutive frames of one filter are grouped: frames 0+2 and 4+6 (V), 1+3 and 5+7 (R)
    groups = sorted(sorted(int(_name(e["path"])[-9:-5]) for e in members) for members in by_output.values())
    assert groups == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_make_plan_stack_threshold_not_reached_gives_singles(rows):
    plan = make_plan(rows, PlanSettings(stack=True, stack_threshold=4))  # 4 per filter, not > 4
    assert Counter(entry["n_group"] for entry in plan) == {1: 8}
    assert len({entry["output"] for entry in plan}) == 8


def test_make_plan_not_stacked_ignores_threshold(rows):
    plan = make_plan(rows, PlanSettings(stack=False, stack_threshold=1))
    assert all(entry["n_group"] == 1 for entry in plan)


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize(("reference", "index"), [("first", 0), ("middle", 2), ("best", None)])
def test_make_plan_reference_frame(rows, align, reference, index):
    plan = make_plan(rows, PlanSettings(align=align, reference=reference))
    table = format_plan(plan, rows)
    for filt in ("V", "R"):
        sequence = f"V1234_Cyg_{filt}_60s_1x1"
        entries = sorted((e for e in plan if e["sequence"] == sequence), key=lambda e: e["mid"])
        expected = ("best" if index is None else entries[index]["frame_id"]) if align else ""
        assert {e["reference"] for e in entries} == {expected}
        # --plan names the light (or says the best is chosen once they are calibrated)
        named = "its best frame (the sharpest" if index is None else Path(entries[index]["path"]).name
        assert (f"{sequence}: registered to {named}" in table) == align


@pytest.mark.parametrize(
    ("batches", "max_batch", "stack"),
    [
        (8, 100, False),
        (3, 100, False),
        (3, 2, False),
        (1, 3, False),
        (20, 100, False),
        (2, 1, True),
        (8, 100, True),
    ],
)
def test_make_plan_batches_cover_every_light_and_respect_max_batch(rows, batches, max_batch, stack):
    settings = PlanSettings(batches=batches, min_batch=1, max_batch=max_batch, stack=stack, stack_threshold=2)
    plan = make_plan(rows, settings)
    ok = [entry for entry in plan if entry["status"] == OK]
    assert len(ok) == 8
    cal = Counter(entry["cal_batch"] for entry in ok)
    assert sum(cal.values()) == 8
    assert max(cal.values()) <= max_batch
    assert len(cal) <= max(batches, math.ceil(8 / max_batch))
    outputs_per_pub: dict[str, set[str]] = defaultdict(set)
    for entry in ok:
        outputs_per_pub[entry["pub_batch"]].add(entry["output"])
    assert max(len(outputs) for outputs in outputs_per_pub.values()) <= max_batch
    n_outputs = len({entry["output"] for entry in ok})
    assert sum(len(outputs) for outputs in outputs_per_pub.values()) == n_outputs  # one batch per output


def test_make_plan_min_batch_keeps_small_nights_in_few_jobs(rows):
    plan = make_plan(rows, PlanSettings(batches=8, min_batch=8))
    assert {entry["cal_batch"] for entry in plan} == {"c0000"}
    plan = make_plan(rows, PlanSettings(batches=8, min_batch=3))  # 3 + 3 + 2 would leave one alone
    assert sorted(Counter(entry["cal_batch"] for entry in plan).values()) == [4, 4]


def test_make_plan_without_a_bias_match_skips_with_nearest_candidate(own_night):
    (own_night.bias_dir / "bias_g120.fits").unlink()
    plan = make_plan(_scan(own_night), PlanSettings())
    assert len(plan) == 8
    for entry in plan:
        assert entry["status"] == SKIPPED
        assert entry["bias"] is None
        assert _name(entry["dark"]) == "dark_60s.fits"
        # bias_g0 and bias_g120_m20C differ in one keyword each; bias_g0 is nearer in time
        assert (
            entry["reason"] == "no matching bias master; nearest bias_g0.fits differs in GAIN (120.0 vs 0.0)"
        )
        assert "cal_batch" not in entry or entry["cal_batch"] in (None, "")


def test_make_plan_without_a_flat_for_one_filter_skips_only_those(own_night):
    (own_night.flat_dir / "flat_R.fits").unlink()
    plan = make_plan(_scan(own_night), PlanSettings())
    statuses = {_name(e["path"]): (e["status"], e["reason"]) for e in plan}
    for light, filt in own_night.truth["filter"].items():
        status, reason = statuses[light]
        if filt == "V":
            assert (status, reason) == (OK, "")
        else:
            assert status == SKIPPED
            assert reason.startswith("no matching flat master; nearest ")
            assert "FILTER (R vs " in reason
    assert [e["status"] for e in plan] == [OK] * 4 + [SKIPPED] * 4  # ok rows first


def test_make_plan_only_given_master_folders_are_used(night):
    plan = make_plan(_scan(night, roles=("bias",)), PlanSettings())
    assert all(entry["status"] == OK for entry in plan)
    assert {_name(entry["bias"]) for entry in plan} == {"bias_g120.fits"}
    assert all(entry.get("dark") is None and entry.get("flat") is None for entry in plan)


def test_make_plan_master_folder_with_only_unusable_files_skips_lights(own_night):
    for path in own_night.dark_dir.iterdir():
        path.unlink()
    (own_night.dark_dir / "broken.fits").write_bytes(b"")
    plan = make_plan(_scan(own_night), PlanSettings())
    assert all(entry["status"] == SKIPPED for entry in plan)
    assert all(entry["reason"] == "no dark master in the dark folder" for entry in plan)


def test_make_plan_same_output_name_second_light_skipped(own_night):
    first = own_night.lights[0]
    copy = first.with_name("zzz_copy.fits")
    shutil.copyfile(first, copy)
    with fits.open(copy, mode="update") as hdul:
        hdul[0].header["CCD-TEMP"] = -9.0  # another header, so not a scan duplicate
    rows = _scan(own_night)
    assert {row["status"] for row in rows if row["folder"] == "light"} == {OK}
    plan = make_plan(rows, PlanSettings())
    by_name = {_name(entry["path"]): entry for entry in plan}
    kept, dropped = by_name[first.name], by_name["zzz_copy.fits"]
    assert kept["status"] == OK
    assert kept["output"] == _expected_name("V", _mid(own_night, first.name))
    assert dropped["status"] == SKIPPED
    assert dropped["output"] == ""
    assert kept["output"] in dropped["reason"]
    assert first.name in dropped["reason"]
    assert sum(entry["status"] == OK for entry in plan) == 8


@pytest.mark.parametrize(
    ("cores", "batches", "threads"), [(2, 1, 2), (2, 3, 1), (8, 3, 2), (1, 1, 1), (4, 8, 1)]
)
def test_publish_threads_spread_the_cores_over_the_publish_batches(cores, batches, threads):
    from types import SimpleNamespace

    from imgproc.dag import Layout, WorkflowInputs

    inputs = WorkflowInputs(Layout({"input_dir": "lights"}), lambda: None)
    rows = [{"pub_batch": f"p{i % batches:04d}", "pub_kind": "stack"} for i in range(3 * batches)]
    rows += [{"pub_batch": "p9999", "pub_kind": "link"}]  # hard links: not counted, one thread
    rows += [{"pub_batch": "", "pub_kind": ""}]  # a skipped light: no batch at all
    inputs.plan = lambda: rows  # type: ignore[method-assign]
    assert inputs.publish_threads(cores)(SimpleNamespace(pub_batch="p0000")) == threads
    assert inputs.publish_threads(cores)(SimpleNamespace(pub_batch="p9999")) == 1


def test_memory_requests_count_a_streamed_frame_as_the_part_a_job_holds():
    """A 61-MP frame (245 MB of float32) is streamed by rows: its jobs ask for the budget and
    8 arrays of at most WHOLE_FRAME_MAX_BYTES (64 MiB), not 8 whole frames (1,870 MiB)."""
    from types import SimpleNamespace

    from imgproc.dag import Layout, WorkflowInputs

    inputs = WorkflowInputs(
        Layout({"input_dir": "lights", "stacking": {"memory_budget_mb": 1024}}), lambda: None
    )
    shapes = {"0": (1080, 1920), "1": (6388, 9576), "2": (4096, 4096)}
    rows = [
        {"cal_batch": f"c{k}", "pub_batch": f"p{k}", "ny": ny, "nx": nx} for k, (ny, nx) in shapes.items()
    ]
    inputs.plan = lambda: rows  # type: ignore[method-assign]
    calibrate = {k: inputs.calibrate_mem_mb(SimpleNamespace(cal_batch=f"c{k}")) for k in shapes}
    publish = {k: inputs.publish_mem_mb(SimpleNamespace(pub_batch=f"p{k}")) for k in shapes}
    assert calibrate == {"0": 400 + 1080 * 1920 * 4 * 8 // 2**20, "1": 400 + 512, "2": 400 + 512}
    assert publish == {k: mb + 1024 for k, mb in calibrate.items()}
    assert inputs.calibrate_mem_mb(SimpleNamespace(cal_batch="c1"), attempt=2) == 2 * (400 + 512)


def test_thumbnails_of_lone_frames_are_an_even_sample_and_stacks_always_have_one(rows, monkeypatch):
    import imgproc.plan

    plan = make_plan(rows, PlanSettings())  # 8 lone frames: all shown under the default limit
    assert all(entry["thumb"] for entry in plan)
    monkeypatch.setattr(imgproc.plan, "REPORT_FRAMES", 3)
    plan = make_plan(rows, PlanSettings())
    ordered = sorted(plan, key=lambda e: e["mid"])
    assert [e["thumb"] for e in ordered] == [True, False, False] * 2 + [True, False]  # every 3rd
    stacked = make_plan(rows, PlanSettings(stack=True, stack_threshold=2))
    assert all(entry["thumb"] for entry in stacked)


def test_link_outputs_are_published_with_their_calibrate_batch(rows):
    plan = make_plan(rows, PlanSettings(batches=4, min_batch=1))
    links = [entry for entry in plan if entry["status"] == OK and entry["pub_kind"] == "link"]
    assert len(links) == 8
    pairs = {(entry["cal_batch"], entry["pub_batch"]) for entry in links}
    # one publish batch per calibrate batch: each can run as soon as its frames are calibrated
    assert len(pairs) == len({cal for cal, _ in pairs}) == len({pub for _, pub in pairs}) == 4


def test_stacks_get_a_publish_job_each_up_to_four_per_batch_and_run_after_calibration(rows, monkeypatch):
    from types import SimpleNamespace

    import imgproc.plan
    from imgproc.dag import CALIBRATE_PRIORITY, Layout, WorkflowInputs

    def stack_batches(batches: int) -> list[int]:
        settings = PlanSettings(batches=batches, min_batch=1, stack=True, stack_threshold=2)
        outputs = {(e["pub_batch"], e["output"]) for e in make_plan(rows, settings) if e["status"] == OK}
        return sorted(Counter(batch for batch, _ in outputs).values())

    assert stack_batches(1) == [1, 1, 1, 1]  # 4 stacks: a job each, up to 4 x batches jobs
    monkeypatch.setattr(imgproc.plan, "HEAVY_JOBS", 1)
    assert stack_batches(2) == [2, 2]
    plan = make_plan(rows, PlanSettings(batches=4, min_batch=1))
    plan[0].update(pub_batch="p0100", pub_kind="stack")
    inputs = WorkflowInputs(Layout({"input_dir": "lights"}), lambda: None)
    inputs.plan = lambda: plan  # type: ignore[method-assign]
    link, stack = (inputs.publish_priority(SimpleNamespace(pub_batch=b)) for b in ("p0000", "p0100"))
    assert link > CALIBRATE_PRIORITY > stack  # hard links first, stacks after every calibration


def test_a_frame_smaller_than_the_binning_is_skipped_saying_why(night) -> None:
    rows = scan(ScanRequest(night.root / "lights"))
    ny, nx = rows[0]["ny"], rows[0]["nx"]
    rows[0] = rows[0] | {"ny": 5, "nx": 9}
    plan = make_plan(rows, PlanSettings(binning=6))
    skipped = [e for e in plan if e["status"] != OK]
    assert [e["path"] for e in skipped] == [rows[0]["path"]]
    assert skipped[0]["reason"] == "the frame (9x5 px) is smaller than the binning 6x6 (-b)"
    assert all(e["status"] == OK for e in make_plan(rows[1:], PlanSettings(binning=min(ny, nx))))


def test_frames_of_one_sequence_but_two_shapes_are_two_sequences(night) -> None:
    rows = scan(ScanRequest(night.root / "lights"))
    lights = [r for r in rows if r["filter"] == "V"]
    ny, nx = lights[0]["ny"], lights[0]["nx"]
    for row in lights[::2]:
        row.update(ny=row["ny"] - 10, nx=row["nx"] + 6)  # e.g. a crop of the same camera
    plan = make_plan(lights, PlanSettings(stack=True, stack_threshold=1, align=True))
    by_sequence = defaultdict(list)
    for entry in plan:
        by_sequence[entry["sequence"]].append(entry)
    assert sorted(by_sequence) == sorted(
        [f"V1234_Cyg_V_60s_1x1_{nx}x{ny}px", f"V1234_Cyg_V_60s_1x1_{nx + 6}x{ny - 10}px"]
    )
    for sequence, entries in by_sequence.items():
        assert len({(e["ny"], e["nx"]) for e in entries}) == 1
        assert sequence.endswith(f"_{entries[0]['nx']}x{entries[0]['ny']}px")
        assert len({e["output"] for e in entries}) == 1  # one stack per shape
        assert {e["reference"] for e in entries} <= {e["frame_id"] for e in entries}


def test_batches_share_the_work_of_big_frames_evenly() -> None:
    from imgproc.plan import UNIT_PIXELS, cut_batches, frame_work

    big = frame_work({"ny": 6388, "nx": 9576})
    assert big == pytest.approx(6388 * 9576 / UNIT_PIXELS)
    assert frame_work({"ny": 500, "nx": 650}) == 1.0
    # ten 61-megapixel frames: ten jobs, which two cores share evenly (not 8 + 2)
    assert cut_batches([big] * 10, 16, 8, 100) == list(range(10))
    # 300 frames of 2048²: 16 batches of 19 frames, as counting frames gave
    small = cut_batches([1.0] * 300, 16, 8, 100)
    assert sorted(Counter(small).values()) == [15] + [19] * 15
    assert cut_batches([1.0] * 30, 16, 8, 100) == [i // 15 for i in range(30)]  # at least min_batch
    assert max(Counter(cut_batches([1.0] * 1000, 2, 8, 100)).values()) == 100  # at most max_batch
    mixed = cut_batches([1.0] * 20 + [big] * 2, 4, 1, 100)
    work = Counter()
    for units, batch in zip([1.0] * 20 + [big] * 2, mixed, strict=True):
        work[batch] += units
    assert max(work.values()) <= big + 1e-9 and mixed == sorted(mixed)


@pytest.mark.parametrize(
    ("frames", "sizes"),
    [(40, [10] * 4), (20, [10, 10]), (12, [6, 6]), (27, [7, 7, 7, 6]), (300, [19] * 15 + [15])],
)
def test_batches_come_in_full_rounds_of_two_or_four_cores(frames: int, sizes: list[int]) -> None:
    """5 batches of 8 would leave the last one alone on 2 or 4 cores: 4 of 10 instead; the work
    is spread evenly over the batches (20 frames: not 6 + 6 + 6 + 2)."""
    from imgproc.plan import cut_batches

    assert sorted(Counter(cut_batches([1.0] * frames, 16, 6, 100)).values(), reverse=True) == sizes


def test_make_plan_gives_big_frames_a_job_each(rows) -> None:
    big_rows = [{**row, "ny": 6388, "nx": 9576} for row in rows]
    plan = make_plan(big_rows, PlanSettings(batches=16, min_batch=8))
    ok = [entry for entry in plan if entry["status"] == OK]
    assert len(ok) == 8 and len({entry["cal_batch"] for entry in ok}) == 8
