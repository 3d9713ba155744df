"""DriveNet: a small multi-head driving-perception network (camera frame in, controls out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DriveNetConfig:
    frame_height: int = 64  # camera frame rows after downscaling
    frame_width: int = 128  # camera frame columns
    channels: tuple[int, ...] = (24, 48, 64, 96)  # conv stages, each halves H and W
    hidden: int = 768  # width of the shared fully connected trunk
    num_controls: int = 2  # steering (rad, +left), acceleration (m/s^2)
    num_lane_outputs: int = 4  # lateral offset of the left/right lane line, near/far


class ConvStage(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DriveNet(nn.Module):
    """Input (B, 3, H, W) in [0, 1]; outputs controls (B, 2) and lanes (B, 4)."""

    def __init__(self, config: DriveNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or DriveNetConfig()
        stages, c_in = [], 3
        for c_out in cfg.channels:
            stages.append(ConvStage(c_in, c_out))
            c_in = c_out
        self.backbone = nn.Sequential(*stages)
        scale = 2 ** len(cfg.channels)
        features = c_in * (cfg.frame_height // scale) * (cfg.frame_width // scale)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(features, cfg.hidden), nn.ReLU())
        self.control_head = nn.Linear(cfg.hidden, cfg.num_controls)
        self.lane_head = nn.Linear(cfg.hidden, cfg.num_lane_outputs)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.backbone(frames)  # (B, C, H/16, W/16)
        h = self.trunk(x)  # (B, hidden)
        return self.control_head(h), self.lane_head(h)  # (B, 2), (B, 4)


def build(**kwargs: object) -> DriveNet:
    """The factory a declaration names: DriveNetConfig's fields as keyword arguments."""
    if "channels" in kwargs:  # TOML has lists, the config a tuple
        kwargs["channels"] = tuple(kwargs["channels"])  # type: ignore[arg-type]
    return DriveNet(DriveNetConfig(**kwargs))  # type: ignore[arg-type]
