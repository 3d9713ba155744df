"""What every aggregation strategy receives and must honour; FedAvg as the reference one.

A strategy reads the round's spooled delta files block by block (never N updates in
memory; coordinate-wise strategies read one block of every update at a time), writes the
new global payload (flat, schema order) to `out_path`, and may keep server state (e.g.
FedAdam's moments) as files in `state_out`, which the round manager stores with the
version and hands back as `state_in` next round, so a restart continues identically.

Rules every strategy follows:
- contributions are in commit order; the same inputs give the same bytes;
- `Contribution.scale` multiplies each float delta as it is read (DP clipping);
- float tensors follow the strategy's maths on the clients' weights (base + delta), as
  Flower computes them; integer tensors (BatchNorm counters) take FedAvg's rule: the
  example-weighted mean delta rounded half-to-even, added to the base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sluice.gateway.core.aggregation import (
    DEFAULT_BLOCK_BYTES,
    Contribution,
    FoldScan,
    fold_fedavg,
)
from sluice.gateway.store.writeback import WriteBehind
from sluice.models.schema import Schema


@dataclass(frozen=True)
class RoundInput:
    schema: Schema
    base_path: Path  # the current global weights, flat payload
    contributions: Sequence[Contribution]  # delta files, in commit order
    server_round: int  # 1 for the first aggregation of this model; optimizers' step count
    state_in: Path | None = None  # directory of the previous round's state files, if any
    block_bytes: int = DEFAULT_BLOCK_BYTES
    # Where a strategy that reads every byte of every delta once, in file order, hashes and
    # measures them as it reads (FedAvg's fold); others leave it alone (the round manager
    # gives one only to those).
    scan: FoldScan | None = None
    # Fed every byte of out_path, in order, as a strategy that writes it front to back
    # writes it (FedAvg's fold): the round manager then hashes and checks the new version
    # from these pieces instead of reading the file again. Others leave it alone.
    written: Callable[[memoryview], None] | None = None


def feed_written(written: Callable[[memoryview], None] | None, data: memoryview) -> None:
    """Hand RoundInput.written a copy of bytes just written from a buffer the strategy
    reuses (it is hashed in a worker after the buffer has moved on)."""
    if written is not None:
        written(memoryview(bytes(data)))


@dataclass(frozen=True)
class RoundReport:
    """Facts for the audit log and manifest (e.g. which updates Krum selected)."""

    facts: Mapping[str, object] = field(default_factory=dict)


class Strategy(Protocol):
    @property
    def name(self) -> str:
        """Flower's class name: "FedAvg", "FedAdam", "Krum", ..."""
        ...

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        """Write the new global payload to out_path; state files (if any) into state_out."""
        ...


@dataclass(frozen=True)
class FedAvg:
    """Example-weighted mean of the deltas added to the base (gateway.core.aggregation)."""

    name: str = "FedAvg"

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        # Closed on the way out, also when a write fails: the fold's workers stop and its
        # files close then, not when the traceback is let go.
        blocks = fold_fedavg(
            inp.schema, inp.base_path, inp.contributions, inp.block_bytes, scan=inp.scan
        )
        with contextlib.closing(blocks), out_path.open("wb", buffering=0) as out:
            # The disk starts writing while the fold runs: the version's fsync (blobs.adopt)
            # then waits for the tail only.
            behind = WriteBehind(out.fileno())
            for block in blocks:
                raw = view = memoryview(block).cast("B")
                while view:
                    view = view[out.write(view) :]
                behind.wrote(raw.nbytes)
                if inp.written is not None:
                    inp.written(raw)  # a buffer of its own: never reused by the fold
        return RoundReport({"num_updates": len(inp.contributions)})


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg on the server; trainers add mu/2 * ||w - w_base||^2 to their loss.

    The gateway tells trainers mu in GetRound (RoundInfo.proximal_mu).
    """

    name: str = "FedProx"
    proximal_mu: float = 0.0
