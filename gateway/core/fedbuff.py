"""Buffered asynchronous aggregation (FedBuff): a version every K updates, stale ones weighted down.

A trainer trains from whatever version it pulled; its update joins the open buffer (the
open round) as long as its base is at most `max_staleness` versions behind. The buffer
closes at K updates (the round quorum) and folds FedAvg-style with each float delta
scaled by the staleness weight

    s(tau) = (1 + tau) ** -exponent,   tau = base of the buffer - base of the update

(exponent 0.5 is FedBuff's 1/sqrt(1 + tau), Nguyen et al. 2022), while the denominator
keeps every update's full example count, so stale updates pull the model less.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FedBuffPolicy:
    max_staleness: int = 4  # versions an update's base may lag behind the buffer's base
    exponent: float = 0.5  # staleness weight (1 + tau) ** -exponent

    def weight(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness {staleness} < 0: an update from the future")
        return float((1 + staleness) ** -self.exponent)
