"""Synthetic scenes: deterministic, different per region, and labelled from what is drawn."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from sluice.clients import scenes
from sluice.clients.scenes import REGIONS, ClipParams, SceneBatch, make_clips


def _params(curvature: list[float], offset_m: list[float], speed_mps: list[float]) -> ClipParams:
    return ClipParams(torch.tensor(curvature), torch.tensor(offset_m), torch.tensor(speed_mps))


def _clean(region: str) -> scenes.RegionStyle:
    # Clear weather without sensor noise, so that pixels can be compared with labels.
    return dataclasses.replace(REGIONS[region], weather="clear", noise_std=0.0)


def test_shapes_dtypes_and_ranges() -> None:
    batch = make_clips("shanghai", 10, seed=0, height=48, width=96)
    assert len(batch) == 10
    assert batch.frames.shape == (10, 3, 48, 96)
    assert batch.controls.shape == (10, 2)
    assert batch.lanes.shape == (10, 4)
    assert {t.dtype for t in (batch.frames, batch.controls, batch.lanes)} == {torch.float32}
    assert batch.frames.min() >= 0.0 and batch.frames.max() <= 1.0
    assert batch.lanes.abs().max() < 1.5


def test_deterministic_per_region_and_seed() -> None:
    a, b = make_clips("chengdu", 300, seed=3), make_clips("chengdu", 300, seed=3)
    for field in ("frames", "controls", "lanes"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.frames, make_clips("chengdu", 300, seed=4).frames)
    # The same seed in another region draws other roads, not the same roads restyled.
    assert not torch.equal(a.controls[:, 0], make_clips("beijing", 300, seed=3).controls[:, 0])


def test_unknown_region_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="shanghai"):
        make_clips("atlantis", 1, seed=0)
    with pytest.raises(KeyError, match="chengdu"):
        scenes.describe("atlantis")


def test_at_least_the_demo_regions_exist_and_describe_in_one_line() -> None:
    assert {"shanghai", "beijing", "shenzhen", "chengdu", "guangzhou", "harbin"} <= set(REGIONS)
    lines = {scenes.describe(r) for r in REGIONS}
    assert len(lines) == len(REGIONS)
    assert all("\n" not in line for line in lines)


def test_regions_differ_in_colour_statistics() -> None:
    stats = {}
    for region in REGIONS:
        frames = make_clips(region, 64, seed=0).frames
        # Per-channel mean and spread: brightness, tint, contrast (fog) and noise.
        stats[region] = torch.cat([frames.mean(dim=(0, 2, 3)), frames.std(dim=(0, 2, 3))])
    for a, b in itertools.combinations(REGIONS, 2):
        assert (stats[a] - stats[b]).abs().max() > 0.02, f"{a} and {b} look alike"
    assert stats["shenzhen"][:3].mean() < stats["beijing"][:3].mean()  # night is darker
    red_over_blue = {r: float(s[0] / s[2]) for r, s in stats.items()}
    assert red_over_blue["chengdu"] > 1.5 > red_over_blue["shanghai"]  # dusk is orange


def test_traffic_side_puts_the_yellow_centre_line_on_the_other_side() -> None:
    gen = torch.Generator().manual_seed(0)
    params = _params([0.0], [0.0], [10.0])
    near, _ = scenes.label_rows(64)
    for region, centre_on_left in (("chengdu", True), ("hongkong", False)):
        row = scenes.draw(_clean(region), params, gen, 64, 128)[0, :, near]  # (3, W)
        yellow = (row[0] + row[1]) / 2 - row[2]
        left, right = yellow[:64].max(), yellow[64:].max()
        assert (left > right) == centre_on_left, region


def test_straight_centred_road_needs_no_steering() -> None:
    style = REGIONS["beijing"]
    params = _params([0.0, 0.0], [0.0, 0.0], [5.0, 30.0])
    controls = scenes.controls_for(style, params)
    assert torch.equal(controls[:, 0], torch.zeros(2))
    # Below the limit it speeds up, above it brakes, within the comfortable range.
    assert controls[0, 1] > 0 > controls[1, 1]
    assert scenes.ACCEL_RANGE[0] <= controls[:, 1].min() <= controls[:, 1].max() <= 2.0
    lanes = scenes.lanes_for(params, 64)
    assert torch.allclose(lanes[:, 0], -lanes[:, 1]) and torch.allclose(lanes[:, 2], -lanes[:, 3])
    assert (lanes[:, 1] > lanes[:, 3]).all()  # lines converge towards the horizon


def test_steering_and_speed_follow_the_road() -> None:
    style = REGIONS["chengdu"]
    # Left bend, right bend, ego right of centre, ego left of centre, tight left bend.
    params = _params([0.02, -0.02, 0.0, 0.0, 0.03], [0.0, 0.0, 0.5, -0.5, 0.0], [10.0] * 5)
    steering, accel = scenes.controls_for(style, params).unbind(1)
    assert steering[0] > 0 > steering[1]
    assert steering[2] > 0 > steering[3]  # steer back towards the lane centre
    assert accel[4] < accel[0] < scenes.controls_for(style, _params([0.0], [0.0], [10.0]))[0, 1]
    lanes = scenes.lanes_for(params, 64)
    assert lanes[0, 2] < lanes[1, 2]  # the far end of a left bend is further left
    assert lanes[2, 0] < lanes[3, 0]  # ego right of centre: the lane appears to its left


def test_lane_labels_sit_on_the_painted_lines() -> None:
    style = _clean("beijing")  # white lines on both sides, daylight
    gen = torch.Generator().manual_seed(1)
    params = scenes.sample_params(style, 32, gen)
    frames = scenes.draw(style, params, gen, 64, 128)
    lanes = scenes.lanes_for(params, 64)
    near, far = scenes.label_rows(64)
    rows = {name: near if name.endswith("near") else far for name in scenes.LANE_LABELS}
    for col, name in enumerate(scenes.LANE_LABELS):
        x = (lanes[:, col] + 1) / 2 * 128 - 0.5  # label in pixel-centre units
        for i in range(len(params)):
            centre = round(float(x[i]))
            window = range(max(centre - 5, 0), min(centre + 6, 128))
            brightness = frames[i, :, rows[name], list(window)].mean(0)
            peak = window[int(brightness.argmax())]
            assert abs(peak - float(x[i])) <= 1.0, (name, i)


def test_speed_is_visible_in_the_frame() -> None:
    style = _clean("beijing")
    slow, fast = (
        scenes.draw(style, _params([0.0], [0.0], [v]), torch.Generator().manual_seed(5), 64, 128)
        for v in (3.0, 30.0)
    )
    # Motion blur smears the kerb blocks beside the road: less contrast at speed.
    kerb = (slice(None), slice(None), slice(44, 64), slice(100, 128))
    assert fast[kerb].std() < slow[kerb].std()


def test_scene_batch_indexing_split_and_concat() -> None:
    batch = make_clips("harbin", 6, seed=0, height=16, width=32)
    head, tail = batch.split(4)
    assert (len(head), len(tail)) == (4, 2)
    picked = batch[torch.tensor([5, 0])]
    assert torch.equal(picked.controls, batch.controls[[5, 0]])
    assert torch.equal(SceneBatch.concat([head, tail]).frames, batch.frames)
    with pytest.raises(ValueError, match="lanes"):
        SceneBatch(batch.frames, batch.controls, batch.lanes[:3])
    assert len(make_clips("harbin", 0, seed=0)) == 0
