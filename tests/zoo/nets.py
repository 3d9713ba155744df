"""Four architectures unlike DriveNet, small enough for the suite, shaped like real ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEncoder(nn.Module):
    """A ViT-style encoder over image patches: attention, LayerNorm, GELU, a class token
    and positional embeddings as parameters; dynamic batch."""

    def __init__(
        self, image: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 4,
        outputs: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, outputs)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.patch(frames).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        scores: torch.Tensor = self.head(self.norm(self.encoder(x)[:, 0]))
        return scores


class MultiTask(nn.Module):
    """Camera frame + vehicle state -> steering, speed and lane-class heads."""

    def __init__(self, state_features: int = 6, width: int = 32) -> None:
        super().__init__()
        self.camera = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.vehicle = nn.Sequential(nn.Linear(state_features, 16), nn.Tanh())
        self.trunk = nn.Linear(8 + 16, width)
        self.steer = nn.Linear(width, 1)
        self.speed = nn.Linear(width, 1)
        self.lanes = nn.Linear(width, 3)

    def forward(
        self, frames: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.trunk(torch.cat([self.camera(frames), self.vehicle(state)], 1)))
        return self.steer(h), self.speed(h), self.lanes(h)


class TiedTokens(nn.Module):
    """Token ids -> next-token logits, the output projection tied to the embedding (one
    parameter under two state_dict names, as GPT-style models do)."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.tanh(self.mix(self.embed(tokens))))
        return logits


class HalfPrecision(nn.Module):
    """float16 and bfloat16 parameters with integer buffers. The float16 layer runs in
    float16; the bfloat16 one is upcast where used, as onnxruntime has no bfloat16 Gemm
    on the CPU."""

    order: torch.Tensor  # buffers, typed for the checker
    seen: torch.Tensor

    def __init__(self, features: int = 8, width: int = 16, outputs: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(features, width).to(torch.float16)
        self.b = nn.Linear(width, outputs).to(torch.bfloat16)
        self.register_buffer("order", torch.arange(outputs - 1, -1, -1, dtype=torch.int64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.to(torch.float16))).to(torch.float32)
        y = F.linear(h, self.b.weight.to(torch.float32), self.b.bias.to(torch.float32))
        return y.index_select(1, self.order)


class BfloatNative(nn.Module):
    """A bfloat16 layer that computes in bfloat16: onnxruntime cannot run it on the CPU,
    so its declaration must be refused at start with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.a(x.to(torch.bfloat16))
        return y.to(torch.float32)


class DataDependent(nn.Module):
    """Branches on a value: it runs in torch, and torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.a(x)
        if float(y.sum()) > 0:
            return y
        return -y


class _Linear42(nn.Module):
    """One Linear(4, 2): the body of the declarations below, each wrong in one way."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.a(x)
        return y


class ExtraState(_Linear42):
    """Uses get_extra_state(): its state_dict holds a dict, which no wire format carries."""

    def get_extra_state(self) -> dict[str, int]:
        return {"version": 3}

    def set_extra_state(self, state: object) -> None:
        pass


class ByteBuffer(_Linear42):
    """A buffer of a dtype the wire format does not carry (uint8 by default)."""

    def __init__(self, dtype: str = "uint8") -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(2, dtype=getattr(torch, dtype)))


def not_a_module() -> int:
    """A factory that returns no nn.Module."""
    return 42


class ExitsInForward(_Linear42):
    """Calls sys.exit() in forward: a start would have ended silently with exit 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import sys

        sys.exit(0)


class ListState(_Linear42):
    """A state_dict() override that returns a list, not a mapping."""

    def state_dict(self, *args: object, **kwargs: object) -> list[int]:  # type: ignore[override]
        return [1, 2]
