"""Synthetic camera frames of a road, drawn per region so that each region's data differs."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Marking = Literal["white_dashed", "white_solid", "yellow_solid", "yellow_double"]
TrafficSide = Literal["right", "left"]
Lighting = Literal["day", "dusk", "night"]
Weather = Literal["clear", "rain", "fog", "snow"]

# Order of the columns of SceneBatch.lanes: ego-lane boundary lines at two image rows.
LANE_LABELS = ("left_near", "right_near", "left_far", "right_far")

# Camera and road geometry shared by every region. Distances in metres; image x is
# normalised to [-1, 1] from the left edge to the right edge.
LANE_WIDTH_M = 3.5
LINE_WIDTH_M = 0.15
DOUBLE_LINE_GAP_M = 0.15
SHOULDER_M = 0.6  # asphalt beyond the edge line before the kerb
KERB_M = 0.3
KERB_PERIOD_M = 2.0  # painted kerb blocks: short enough that motion blur visibly smears them
DASH_M, DASH_PERIOD_M = 6.0, 15.0  # Chinese standard dashed line: 6 m paint, 9 m gap
HORIZON = 0.4  # horizon row as a fraction of the frame height
NEAR_DEPTH_M = 4.0  # ground depth at the bottom edge of the frame
MAX_DEPTH_M = 200.0  # rows closer to the horizon than this depth are drawn at it
# The ego lane spans x in [-0.5, 0.5] at the bottom edge when centred: half the frame.
FOCAL = 0.5 * NEAR_DEPTH_M / (LANE_WIDTH_M / 2)
EXPOSURE_S = 0.1  # motion blur along the road: how speed becomes visible in one frame
EXPOSURE_TARGET = 0.45  # mean brightness auto-exposure aims for
EXPOSURE_GAIN_RANGE = (0.7, 3.0)  # night stays darker than day: the gain runs out
NEAR_ROW, FAR_ROW = 0.9, 0.3  # label rows, as a fraction of the ground from horizon to bottom

# Controls: a pure-pursuit steering law and a speed controller that slows for curves.
WHEELBASE_M = 2.8
LOOKAHEAD_M = 10.0
SPEED_GAIN = 0.3  # (m/s^2) per (m/s) of speed error
ACCEL_RANGE = (-3.0, 2.0)  # m/s^2, comfortable braking and acceleration

_CHUNK = 256  # clips drawn at once; bounds peak memory at ~30 float tensors of one chunk

_PAINT = {
    "white": (0.92, 0.92, 0.88),
    "yellow": (0.95, 0.75, 0.12),
}
# Multiplier applied to the whole scene and the colour of the sky, per lighting.
_LIGHT: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "day": ((1.0, 1.0, 1.0), (0.55, 0.70, 0.92)),
    "dusk": ((0.85, 0.62, 0.45), (0.80, 0.45, 0.30)),
    "night": ((0.30, 0.30, 0.36), (0.03, 0.03, 0.08)),
}


@dataclass(frozen=True)
class RegionStyle:
    marking: Marking  # the line between the ego lane and the centre of the road
    traffic_side: TrafficSide  # "right": ego lane right of the road centre (mainland China)
    lighting: Lighting
    weather: Weather
    curvature_std: float  # 1/m, spread of road curvature; 0.01 is a 100 m radius
    road_tone: float  # grey level of the asphalt in daylight
    roadside_rgb: tuple[float, float, float]  # verge, pavement or snow beside the road
    speed_mean_mps: float
    speed_std_mps: float
    speed_limit_mps: float
    lateral_accel_max: float = 2.0  # m/s^2 the speed controller allows in a curve
    visibility_m: float = 400.0  # depth at which haze hides ~63% of the scene
    noise_std: float = 0.01  # sensor noise
    offset_max_m: float = 0.8  # the ego car wanders up to this far from the lane centre


# fmt: off
# One region per paragraph, a line each for look, road and speed: easier to compare
# regions than the formatter's one argument per line.
REGIONS: dict[str, RegionStyle] = {
    # Wet dark asphalt, multi-lane arterials with dashed dividers.
    "shanghai": RegionStyle(
        marking="white_dashed", traffic_side="right", lighting="day", weather="rain",
        curvature_std=0.006, road_tone=0.22, roadside_rgb=(0.50, 0.50, 0.52), noise_std=0.015,
        speed_mean_mps=13.0, speed_std_mps=3.0, speed_limit_mps=16.7, lateral_accel_max=1.6,
    ),
    # Straight ring roads in haze, pale concrete.
    "beijing": RegionStyle(
        marking="white_solid", traffic_side="right", lighting="day", weather="fog",
        curvature_std=0.002, road_tone=0.48, roadside_rgb=(0.60, 0.57, 0.50), visibility_m=45.0,
        speed_mean_mps=16.0, speed_std_mps=4.0, speed_limit_mps=22.2,
    ),
    # Night driving on new black asphalt, lit by the headlights.
    "shenzhen": RegionStyle(
        marking="yellow_solid", traffic_side="right", lighting="night", weather="clear",
        curvature_std=0.008, road_tone=0.16, roadside_rgb=(0.35, 0.38, 0.40), noise_std=0.012,
        speed_mean_mps=14.0, speed_std_mps=3.0, speed_limit_mps=16.7,
    ),
    # Hilly two-lane roads at dusk, mist in the basin.
    "chengdu": RegionStyle(
        marking="yellow_double", traffic_side="right", lighting="dusk", weather="fog",
        curvature_std=0.018, road_tone=0.30, roadside_rgb=(0.25, 0.45, 0.20), visibility_m=90.0,
        speed_mean_mps=9.0, speed_std_mps=3.0, speed_limit_mps=13.9,
    ),
    # Subtropical downpour at dusk, green verges.
    "guangzhou": RegionStyle(
        marking="white_dashed", traffic_side="right", lighting="dusk", weather="rain",
        curvature_std=0.010, road_tone=0.26, roadside_rgb=(0.20, 0.50, 0.22), noise_std=0.02,
        speed_mean_mps=11.0, speed_std_mps=3.0, speed_limit_mps=16.7, lateral_accel_max=1.5,
    ),
    # Snow on the verges and in the air, slow and careful.
    "harbin": RegionStyle(
        marking="white_dashed", traffic_side="right", lighting="day", weather="snow",
        curvature_std=0.008, road_tone=0.55, roadside_rgb=(0.90, 0.92, 0.95),
        speed_mean_mps=8.0, speed_std_mps=2.0, speed_limit_mps=11.1, lateral_accel_max=1.0,
    ),
    # Left-hand traffic: the ego lane sits left of the road centre.
    "hongkong": RegionStyle(
        marking="yellow_double", traffic_side="left", lighting="night", weather="clear",
        curvature_std=0.015, road_tone=0.20, roadside_rgb=(0.40, 0.40, 0.45),
        speed_mean_mps=12.0, speed_std_mps=3.0, speed_limit_mps=13.9,
    ),
}
# fmt: on


def get_style(region: str) -> RegionStyle:
    try:
        return REGIONS[region]
    except KeyError:
        known = ", ".join(sorted(REGIONS))
        raise KeyError(f"unknown region {region!r}; known regions: {known}") from None


def describe(region: str) -> str:
    """One line on how a region's driving looks, for logs and the demo."""
    s = get_style(region)
    return (
        f"{s.traffic_side}-hand traffic, {s.marking.replace('_', ' ')} centre-side "
        f"line, {s.lighting}, {s.weather}, curvature sd {s.curvature_std:.3f}/m, "
        f"road tone {s.road_tone:.2f}, {s.speed_mean_mps:.0f}±{s.speed_std_mps:.0f} m/s "
        f"(limit {s.speed_limit_mps:.0f})"
    )


@dataclass(frozen=True)
class SceneBatch:
    """Frames with their labels; one clip is one frame."""

    frames: torch.Tensor  # (N, 3, H, W) float32 in [0, 1]
    controls: torch.Tensor  # (N, 2) float32: steering (rad, +left), acceleration (m/s^2)
    lanes: torch.Tensor  # (N, 4) float32: image x of LANE_LABELS, roughly [-1, 1]

    def __post_init__(self) -> None:
        if self.frames.dim() != 4 or self.frames.shape[1] != 3:
            raise ValueError(f"frames: expected shape (N, 3, H, W), got {tuple(self.frames.shape)}")
        n = self.frames.shape[0]
        if tuple(self.controls.shape) != (n, 2):
            raise ValueError(f"controls: expected shape ({n}, 2), got {tuple(self.controls.shape)}")
        if tuple(self.lanes.shape) != (n, 4):
            raise ValueError(f"lanes: expected shape ({n}, 4), got {tuple(self.lanes.shape)}")

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> SceneBatch:
        """A sub-batch by slice or index tensor (an int would drop the batch dimension)."""
        return SceneBatch(self.frames[index], self.controls[index], self.lanes[index])

    def split(self, num_first: int) -> tuple[SceneBatch, SceneBatch]:
        return self[:num_first], self[num_first:]

    @classmethod
    def concat(cls, batches: Sequence[SceneBatch]) -> SceneBatch:
        return cls(
            torch.cat([b.frames for b in batches]),
            torch.cat([b.controls for b in batches]),
            torch.cat([b.lanes for b in batches]),
        )


@dataclass(frozen=True)
class ClipParams:
    """What each clip's road looks like; the labels are a function of these alone."""

    curvature: torch.Tensor  # (N,) 1/m, positive bends left
    offset_m: torch.Tensor  # (N,) ego position right of the lane centre
    speed_mps: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return int(self.curvature.shape[0])

    def __getitem__(self, index: slice) -> ClipParams:
        return ClipParams(self.curvature[index], self.offset_m[index], self.speed_mps[index])


def sample_params(style: RegionStyle, num_clips: int, gen: torch.Generator) -> ClipParams:
    curvature = (torch.randn(num_clips, generator=gen) * style.curvature_std).clamp(-0.03, 0.03)
    offset = (torch.rand(num_clips, generator=gen) * 2 - 1) * style.offset_max_m
    speed = torch.randn(num_clips, generator=gen) * style.speed_std_mps + style.speed_mean_mps
    return ClipParams(curvature, offset, speed.clamp(2.0, 35.0))


def controls_for(style: RegionStyle, params: ClipParams) -> torch.Tensor:
    """(N, 2) steering and acceleration an expert driver would apply on this road."""
    # Pure pursuit toward the lane centre LOOKAHEAD_M ahead: its lateral position is
    # -(offset + curvature * L^2 / 2), and the arc through it has this curvature.
    path_curvature = params.curvature + 2 * params.offset_m / LOOKAHEAD_M**2
    steering = torch.atan(WHEELBASE_M * path_curvature)
    # Slow to the speed at which the curve's lateral acceleration stays comfortable.
    curve_speed = torch.sqrt(style.lateral_accel_max / params.curvature.abs().clamp(min=1e-6))
    target = curve_speed.clamp(max=style.speed_limit_mps)
    accel = (SPEED_GAIN * (target - params.speed_mps)).clamp(*ACCEL_RANGE)
    return torch.stack([steering, accel], dim=1).float()


def _row_geometry(height: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Horizon row, and the ground depth at the centre of every row and the depth it spans.

    Rows at or above the horizon get MAX_DEPTH_M, where haze has swallowed the road.
    """
    horizon = round(HORIZON * height)
    ground_rows = height - horizon
    y = torch.arange(height, dtype=torch.float64) + 0.5
    s = (y - horizon) / ground_rows  # 1 at the bottom edge, 0 at the horizon

    def depth(s: torch.Tensor) -> torch.Tensor:
        return NEAR_DEPTH_M / s.clamp(min=NEAR_DEPTH_M / MAX_DEPTH_M)

    half_row = 0.5 / ground_rows
    span = depth(s - half_row) - depth(s + half_row)
    return horizon, depth(s), span.clamp(min=1e-3)


def label_rows(height: int) -> tuple[int, int]:
    """Image rows (near, far) at which SceneBatch.lanes is read off the drawing."""
    horizon = round(HORIZON * height)
    ground_rows = height - horizon
    near = min(height - 1, horizon + int(NEAR_ROW * ground_rows))
    far = horizon + int(FAR_ROW * ground_rows)
    return near, far


def lanes_for(params: ClipParams, height: int) -> torch.Tensor:
    """(N, 4) image x of the ego lane's left and right lines at the near and far label rows."""
    _, depth, _ = _row_geometry(height)
    cols = []
    for row in label_rows(height):
        z = float(depth[row])
        shift = params.offset_m.double() + params.curvature.double() * z * z / 2
        for line_m in (-LANE_WIDTH_M / 2, LANE_WIDTH_M / 2):
            cols.append(FOCAL * (line_m - shift) / z)
    return torch.stack(cols, dim=1).float()


def _stripe_cover(z: torch.Tensor, blur: torch.Tensor, on: float, period: float) -> torch.Tensor:
    """Fraction of [z - blur/2, z + blur/2] on the painted part of a periodic stripe."""

    def integral(x: torch.Tensor) -> torch.Tensor:
        k = torch.floor(x / period)
        return k * on + (x - k * period).clamp(max=on)

    return (integral(z + blur / 2) - integral(z - blur / 2)) / blur


def _line_cover(x_m: torch.Tensor, line_m: float, pixel_m: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of a pixel by a painted line LINE_WIDTH_M wide."""
    inside = LINE_WIDTH_M / 2 + pixel_m / 2 - (x_m - line_m).abs()
    return (inside / pixel_m).clamp(0, 1).clamp(max=LINE_WIDTH_M / pixel_m)


def _rgb(c: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)


def draw(
    style: RegionStyle, params: ClipParams, gen: torch.Generator, height: int, width: int
) -> torch.Tensor:
    """(N, 3, H, W) frames of the roads in params, in the region's look.

    gen draws what the labels don't depend on: dash phase, asphalt grain, rain, noise.
    """
    n = len(params)
    horizon, depth64, span64 = _row_geometry(height)
    z = depth64.float().view(1, height, 1)  # (1, H, 1)
    span = span64.float().view(1, height, 1)
    ground = (torch.arange(height) >= horizon).view(1, 1, height, 1)
    u = (torch.arange(width, dtype=torch.float32) + 0.5) * 2 / width - 1  # (W,)
    pixel_m = (2 / width) * z / FOCAL  # (1, H, 1) width of one pixel on the ground

    # Lateral ground position of every pixel, relative to the ego lane's centre.
    curve = params.curvature.view(n, 1, 1)
    x_m = u.view(1, 1, width) * z / FOCAL + params.offset_m.view(n, 1, 1) + curve * z * z / 2
    side = 1.0 if style.traffic_side == "right" else -1.0
    x_m = x_m * side  # mirror so that the road centre is always at negative x_m

    edge_m = LANE_WIDTH_M / 2
    inner_m = -LANE_WIDTH_M / 2
    road = (x_m <= edge_m + SHOULDER_M).float()  # oncoming lanes run off the frame

    # Speed shows as motion blur along the road: kerb blocks and dashes smear.
    blur = (params.speed_mps.view(n, 1, 1) * EXPOSURE_S).clamp(min=1e-3) + span
    dash_phase = torch.rand(n, 1, 1, generator=gen) * DASH_PERIOD_M
    kerb_phase = torch.rand(n, 1, 1, generator=gen) * KERB_PERIOD_M
    kerb_zone = ((x_m > edge_m + SHOULDER_M) & (x_m <= edge_m + SHOULDER_M + KERB_M)).float()
    kerb_light = _stripe_cover(z + kerb_phase, blur, KERB_PERIOD_M / 2, KERB_PERIOD_M)

    white = _line_cover(x_m, edge_m, pixel_m)
    if style.marking == "white_dashed":
        dashes = _stripe_cover(z + dash_phase, blur, DASH_M, DASH_PERIOD_M)
        white = torch.maximum(white, _line_cover(x_m, inner_m, pixel_m) * dashes)
    elif style.marking == "white_solid":
        white = torch.maximum(white, _line_cover(x_m, inner_m, pixel_m))
    if style.marking.startswith("white"):
        centre_m = inner_m - LANE_WIDTH_M  # one more lane, then the yellow centre line
        yellow = _line_cover(x_m, centre_m, pixel_m)
    elif style.marking == "yellow_solid":
        yellow = _line_cover(x_m, inner_m, pixel_m)
    else:
        gap = (DOUBLE_LINE_GAP_M + LINE_WIDTH_M) / 2
        yellow = torch.maximum(
            _line_cover(x_m, inner_m - gap, pixel_m), _line_cover(x_m, inner_m + gap, pixel_m)
        )

    tone = style.road_tone + 0.03 * torch.randn(n, 1, 1, 1, generator=gen)
    grain = 0.02 * torch.randn(n, 1, height, width, generator=gen)
    asphalt = (tone + grain).expand(n, 3, height, width)
    roadside = _rgb(style.roadside_rgb) + grain
    img = torch.lerp(roadside, asphalt, road.unsqueeze(1))
    kerb = 0.25 + 0.55 * kerb_light.unsqueeze(1)
    img = torch.lerp(img, kerb.expand_as(img), kerb_zone.unsqueeze(1))
    img = torch.lerp(img, _rgb(_PAINT["white"]).expand_as(img), white.unsqueeze(1))
    img = torch.lerp(img, _rgb(_PAINT["yellow"]).expand_as(img), yellow.unsqueeze(1))

    light, sky_rgb = _LIGHT[style.lighting]
    exposure = 1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    img = img * _rgb(light) * exposure
    if style.lighting == "night":
        # Headlights: a bright cone ahead of the car that fades with depth.
        beam = torch.exp(-((x_m / 2.5) ** 2)) * torch.exp(-z / 25.0)
        img = img * (1 + 3.0 * beam.unsqueeze(1))

    haze_rgb = _rgb(sky_rgb) if style.weather != "fog" else _rgb(light) * 0.72
    haze = 1 - torch.exp(-z / style.visibility_m).unsqueeze(1)
    img = torch.lerp(img, haze_rgb.expand_as(img), haze)
    img = torch.where(ground, img, haze_rgb if style.weather == "fog" else _rgb(sky_rgb))
    # Auto-exposure, as in any car camera: dark scenes are amplified, and so is their sensor
    # noise. It also keeps the merged model's first layers from seeing wildly different
    # brightness per region, which BatchNorm statistics averaged by FedAvg cope with badly.
    luma = img.double().mean(dim=(1, 2, 3), keepdim=True).float().clamp(min=1e-3)
    gain = (EXPOSURE_TARGET / luma).clamp(*EXPOSURE_GAIN_RANGE)
    img = img * gain

    if style.weather == "rain":
        # Sparse seeds smeared 5 px along a diagonal; shifted adds beat a 1-channel conv.
        drops = (torch.rand(n, 1, height, width, generator=gen) < 0.006).float()
        padded = F.pad(drops, (2, 2, 2, 2))
        shifts = [padded[..., 2 + d : 2 + d + height, 2 - d : 2 - d + width] for d in range(-2, 3)]
        streaks = torch.stack(shifts).sum(0).clamp(max=1)
        img = torch.lerp(img * 0.85, torch.full_like(img, 0.8), 0.6 * streaks)
    elif style.weather == "snow":
        flakes = (torch.rand(n, 1, height, width, generator=gen) < 0.01).float()
        flakes = F.max_pool2d(flakes, kernel_size=2, stride=1, padding=1)[..., :height, :width]
        img = torch.lerp(img, torch.full_like(img, 0.95), 0.8 * flakes)

    img = img + style.noise_std * gain * torch.randn(n, 3, height, width, generator=gen)
    return img.clamp(0, 1).contiguous()


def _region_seed(region: str, seed: int) -> int:
    # Mix the region in so that two regions with the same seed draw unrelated roads.
    words = np.random.SeedSequence([seed, zlib.crc32(region.encode())]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1])) & (2**63 - 1)


def make_clips(
    region: str, num_clips: int, seed: int, height: int = 64, width: int = 128
) -> SceneBatch:
    """num_clips frames of a region's roads with their labels; deterministic per (region, seed)."""
    style = get_style(region)
    if num_clips < 0 or seed < 0:
        raise ValueError(f"num_clips and seed: expected >= 0, got {num_clips} and {seed}")
    if height < 8 or width < 8:
        raise ValueError(f"frame size: expected at least 8x8, got {height}x{width}")
    gen = torch.Generator().manual_seed(_region_seed(region, seed))
    params = sample_params(style, num_clips, gen)
    frames = [
        draw(style, params[i : i + _CHUNK], gen, height, width) for i in range(0, num_clips, _CHUNK)
    ]
    return SceneBatch(
        torch.cat(frames) if frames else torch.zeros(0, 3, height, width),
        controls_for(style, params),
        lanes_for(params, height),
    )
