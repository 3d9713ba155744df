"""Flower's Byzantine-robust strategies, block-wise over spooled updates: never N models in memory.

FedTrimmedAvg, FedMedian, Krum (MultiKrum) and Bulyan compute exactly what
`flwr.server.strategy.aggregate` computes on the clients' weights (base + scaled delta):
the coordinate-wise rules apply the same numpy calls to the same columns, one block of
every update at a time; Krum and Bulyan first fill the N x N matrix of squared distances
in one pass over the files, then choose from it, then read the chosen updates again.
Integer tensors take FedAvg's rule over every update (see base.py), whatever the strategy.

Memory, every strategy: (N + 2) x block_bytes (a block of each update, the base block, and
temporaries bounded by one block) plus O(N^2) for the distances; never O(N x model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# One short-read check and message for every reader of spooled files.
from sluice.gateway.core.aggregation import _read, add_integer_mean
from sluice.gateway.core.strategies.base import RoundInput, RoundReport, feed_written
from sluice.gateway.store.direct import DirectFile, WindowReader, open_regular_in
from sluice.models.schema import TensorSpec

# Fewest columns per numpy call in the coordinate-wise loops, whatever the block size.
_MIN_COLUMNS = 512

# Combines a block of the members' float weights (K, count), in place, into out (count,).
_Combine = Callable[[np.ndarray, np.ndarray], None]


class _Spool:
    """The round's files, open, with one reusable block for each update and for the base."""

    def __init__(self, inp: RoundInput, stack: ExitStack) -> None:
        if not inp.contributions:
            raise ValueError("aggregation needs at least one contribution")
        if any(c.num_examples <= 0 for c in inp.contributions):
            raise ValueError("every contribution needs num_examples > 0")
        self.inp = inp
        self.num_examples = [c.num_examples for c in inp.contributions]
        self.row_bytes = max(inp.block_bytes, 8)  # a block holds at least one element
        self._base_fd = open_regular_in(stack, inp.base_path)
        # The updates are cold (spooled with O_DIRECT, scanned with O_DIRECT): read them so
        # too, through one window, rather than fill the page cache with them.
        self._files = [stack.enter_context(DirectFile(c.path)) for c in inp.contributions]
        self._reader = WindowReader(self.row_bytes)
        self._rows = np.empty(len(self._files) * self.row_bytes, dtype=np.uint8)
        self._base = np.empty(self.row_bytes, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._files)

    def blocks(self) -> Iterator[tuple[TensorSpec, int, int]]:
        """(spec, first byte, element count) of every block, in payload order."""
        for spec, start, end in self.inp.schema.spans():
            itemsize = spec.np_dtype.itemsize
            step = max(self.row_bytes // itemsize, 1) * itemsize
            for first in range(start, end, step):
                yield spec, first, min(step, end - first) // itemsize

    def base(self, spec: TensorSpec, first: int, count: int) -> np.ndarray:
        base = self._base[: count * spec.np_dtype.itemsize].view(spec.np_dtype)
        _read(self._base_fd, base, first)
        return base

    def deltas(
        self, spec: TensorSpec, first: int, count: int, members: Sequence[int]
    ) -> np.ndarray:
        """(K, count): the members' deltas, in the order given; float ones times their scale."""
        size = count * spec.np_dtype.itemsize
        rows = self._rows[: len(members) * size].view(spec.np_dtype).reshape(len(members), count)
        for row, i in zip(rows, members, strict=True):
            self._reader.read_into(self._files[i], row, first)
            scale = self.inp.contributions[i].scale
            if spec.is_float and scale != 1.0:
                np.multiply(row, row.dtype.type(scale), out=row)
        return rows

    def columns(self, count: int, num_rows: int) -> Iterator[slice]:
        """Column slices whose float64 temporaries over `num_rows` rows (a few per element)
        fit in one block, or in num_rows x 16 KiB if that is more (tiny blocks stay fast)."""
        width = max(self.row_bytes // (32 * max(num_rows, 1)), _MIN_COLUMNS)
        for start in range(0, count, width):
            yield slice(start, min(start + width, count))

    def write_global(
        self,
        out_path: Path,
        members: Sequence[int],
        combine: _Combine,
        written: Callable[[memoryview], None] | None = None,
    ) -> None:
        """Write the new global payload: float blocks are `combine`d from the members' weights
        (base + scaled delta), integer blocks take FedAvg's rule over every update; each
        block written is fed to `written` (RoundInput.written)."""
        everyone = range(len(self))
        with out_path.open("wb") as out:
            for spec, first, count in self.blocks():
                base = self.base(spec, first, count)
                if spec.is_half:  # combined in float32, rounded once
                    wide = self.deltas(spec, first, count, members).astype(np.float32)
                    result = base.astype(np.float32)
                    np.add(wide, result, out=wide)
                    combine(wide, result)
                    base[...] = result
                elif spec.is_float:
                    weights = self.deltas(spec, first, count, members)
                    np.add(weights, base, out=weights)
                    combine(weights, base)  # the base block is spent: it takes the result
                else:
                    self._fedavg_integers(self.deltas(spec, first, count, everyone), base)
                out.write(base.view(np.uint8).data)
                feed_written(written, base.view(np.uint8).data)

    def _fedavg_integers(self, deltas: np.ndarray, base: np.ndarray) -> None:
        """base += rint(sum(n_i * delta_i) / sum(n_i)), as `fold_fedavg` does, bit for bit."""
        total = sum(self.num_examples)
        for cols in self.columns(base.size, 4):
            acc = np.zeros(cols.stop - cols.start)
            weighted = np.empty_like(acc)
            for row, num_examples in zip(deltas, self.num_examples, strict=True):
                np.multiply(row[cols], float(num_examples), out=weighted)
                np.add(acc, weighted, out=acc)
            np.divide(acc, total, out=acc)
            np.rint(acc, out=acc)
            add_integer_mean(base[cols], acc)

    def squared_distances(self) -> np.ndarray:
        """(N, N) squared L2 distances between the clients' weights, in one pass over the files.

        The base cancels, so these are distances between the scaled deltas, each difference
        and sum in float64 (Flower: `_compute_distances` in the concatenated weights' dtype,
        float32 for an all-float32 model). Integer tensors count, as in Flower.
        """
        n = len(self)
        dist = np.zeros((n, n))
        everyone = range(n)
        for spec, first, count in self.blocks():
            rows = self.deltas(spec, first, count, everyone)
            for cols in self.columns(count, n - 1):  # one (n - 1, width) float64 diff
                for i in range(n - 1):
                    diff = np.subtract(rows[i + 1 :, cols], rows[i, cols], dtype=np.float64)
                    dist[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
        return dist + dist.T


def _krum_scores(dist: np.ndarray, num_malicious: int) -> np.ndarray:
    """Flower's Krum score: each update's summed distance to its n - f - 2 nearest others."""
    num_closest = max(1, len(dist) - num_malicious - 2)
    # argsort()[0] is the update itself (distance 0), as in `aggregate_krum`.
    return np.array([np.sum(row[np.argsort(row)[1 : num_closest + 1]]) for row in dist])


def _weighted_mean(factors: Sequence[float]) -> _Combine:
    """sum(factor_i * w_i), in the tensors' dtype; one factor of 1.0 copies w_0 exactly."""

    def combine(weights: np.ndarray, out: np.ndarray) -> None:
        np.multiply(weights[0], out.dtype.type(factors[0]), out=out)
        for row, factor in zip(weights[1:], factors[1:], strict=True):
            np.multiply(row, row.dtype.type(factor), out=row)
            np.add(out, row, out=out)

    return combine


@dataclass(frozen=True, kw_only=True)
class FedTrimmedAvg:
    """Coordinate-wise mean of the clients' weights after cutting int(beta * N) from each end.

    Unweighted, as Flower's `aggregate_trimmed_avg` (scipy's trim_mean: `np.partition` at
    the cuts, then `np.mean` of the middle, in the tensor's dtype). Memory: see module.
    """

    beta: float = 0.2  # fraction cut from each end, in [0, 0.5)
    name: str = field(default="FedTrimmedAvg", init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"FedTrimmedAvg: beta must be in [0, 0.5), got {self.beta}")

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        with ExitStack() as stack:
            spool = _Spool(inp, stack)
            n = len(spool)
            low = int(self.beta * n)  # Flower's lowercut; the upper cut is n - low
            high = n - low

            def trimmed_mean(weights: np.ndarray, out: np.ndarray) -> None:
                weights.partition((low, high - 1), axis=0)
                for cols in spool.columns(out.size, 1):
                    out[cols] = np.mean(weights[low:high, cols], axis=0)

            spool.write_global(out_path, range(n), trimmed_mean, inp.written)
        return RoundReport({"num_updates": n, "trimmed_per_side": low})


@dataclass(frozen=True, kw_only=True)
class FedMedian:
    """Coordinate-wise median of the clients' weights: `np.median`, unweighted, as Flower.

    Even N: the mean of the two middle values, in the tensor's dtype. Memory: see module.
    """

    name: str = field(default="FedMedian", init=False)

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        with ExitStack() as stack:
            spool = _Spool(inp, stack)

            def median(weights: np.ndarray, out: np.ndarray) -> None:
                # np.median's NaN check (`take`) allocates ~40 bytes a column: budget 4 rows;
                # no `out=`: its float16 mean would round differently from Flower's.
                for cols in spool.columns(out.size, 4):
                    out[cols] = np.median(weights[:, cols], axis=0, overwrite_input=True)

            spool.write_global(out_path, range(len(spool)), median, inp.written)
        return RoundReport({"num_updates": len(inp.contributions)})


@dataclass(frozen=True, kw_only=True)
class Krum:
    """Krum (Blanchard et al. 2017): the update with the smallest summed squared distance
    to its N - f - 2 nearest others; with num_clients_to_keep = m > 0, MultiKrum: the
    example-weighted mean of the m best, as Flower's `aggregate_krum` (which calls its
    weighted `aggregate`). Facts: `selected` (commit-order indices) and `scores`.

    Preconditions (Flower checks neither and computes regardless): with f > 0, N >= 2f + 3,
    the bound of Krum's guarantee; m <= N (Flower's slice silently keeps fewer).
    Memory: see module.
    """

    num_malicious_clients: int = 0  # f
    num_clients_to_keep: int = 0  # 0: Krum; m > 0: MultiKrum
    name: str = field(default="Krum", init=False)

    def __post_init__(self) -> None:
        if self.num_malicious_clients < 0 or self.num_clients_to_keep < 0:
            raise ValueError(
                "Krum: num_malicious_clients and num_clients_to_keep must be >= 0, got "
                f"{self.num_malicious_clients} and {self.num_clients_to_keep}"
            )

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        n, f, keep = len(inp.contributions), self.num_malicious_clients, self.num_clients_to_keep
        if f > 0 and n < 2 * f + 3:
            raise ValueError(
                f"Krum: num_malicious_clients={f} needs at least 2f + 3 = {2 * f + 3} updates "
                f"(N > 2f + 2), got {n}; lower num_malicious_clients or aggregate more updates"
            )
        if keep > n:
            raise ValueError(
                f"MultiKrum: num_clients_to_keep={keep} is more than the {n} updates; "
                f"set it to at most {n}"
            )
        with ExitStack() as stack:
            spool = _Spool(inp, stack)
            scores = _krum_scores(spool.squared_distances(), f)
            if keep > 0:
                # Flower's order (descending score, the `keep` best last), for its sum order.
                selected = [int(i) for i in np.argsort(scores)[::-1][n - keep :]]
            else:
                selected = [int(np.argmin(scores))]
            total = sum(spool.num_examples[i] for i in selected)
            factors = [spool.num_examples[i] / total for i in selected]
            spool.write_global(out_path, selected, _weighted_mean(factors), inp.written)
        return RoundReport(
            {"num_updates": n, "selected": selected, "scores": [float(s) for s in scores]}
        )


@dataclass(frozen=True, kw_only=True)
class Bulyan:
    """Bulyan (El Mhamdi et al. 2018) as Flower's `aggregate_bulyan` with Krum first:

    Krum chooses theta = N - 2f updates one at a time (each time among those left, with
    N' - f - 2 neighbours); then, per coordinate, the mean of the beta = theta - 2f chosen
    values closest to their median. Unweighted. Needs N >= 4f + 3 (as Flower).
    Facts: `selected` (commit-order indices, in the order Krum chose them), `theta`, `beta`.
    Memory: see module.
    """

    num_malicious_clients: int = 0  # f
    # Flower passes this to its first rule, aggregate_krum (its Bulyan fails without it).
    # Only 0 works there: Bulyan looks the rule's result up among the updates, and a
    # MultiKrum mean is none of them ("The reference weights not found").
    to_keep: int = 0
    name: str = field(default="Bulyan", init=False)

    def __post_init__(self) -> None:
        if self.num_malicious_clients < 0:
            raise ValueError(
                f"Bulyan: num_malicious_clients must be >= 0, got {self.num_malicious_clients}"
            )
        if self.to_keep != 0:
            raise ValueError(
                f"Bulyan: to_keep must be 0 (Krum picks one update at a time), got "
                f"{self.to_keep}; Flower's Bulyan fails with MultiKrum as its first rule"
            )

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        n, f = len(inp.contributions), self.num_malicious_clients
        if n < 4 * f + 3:
            lower = (
                f"lower num_malicious_clients (at most {(n - 3) // 4} here) or " if n >= 3 else ""
            )
            raise ValueError(
                f"Bulyan: num_malicious_clients={f} needs at least 4f + 3 = {4 * f + 3} "
                f"updates, got {n}; {lower}aggregate more updates"
            )
        theta = n - 2 * f
        beta = theta - 2 * f
        with ExitStack() as stack:
            spool = _Spool(inp, stack)
            dist = spool.squared_distances()
            left, selected = list(range(n)), []
            for _ in range(theta):
                scores = _krum_scores(dist[np.ix_(left, left)], f)
                selected.append(left.pop(int(np.argmin(scores))))

            def closest_to_median_mean(weights: np.ndarray, out: np.ndarray) -> None:
                # Flower's aggregate_median then _aggregate_n_closest_weights, per column.
                for cols in spool.columns(out.size, theta):
                    chosen = weights[:, cols]
                    median = np.median(chosen, axis=0)
                    nearest = np.argpartition(np.abs(median - chosen), kth=beta - 1, axis=0)
                    closest = np.take_along_axis(chosen, nearest, axis=0)[:beta]
                    out[cols] = np.mean(closest, axis=0)

            spool.write_global(out_path, selected, closest_to_median_mean, inp.written)
        return RoundReport({"num_updates": n, "selected": selected, "theta": theta, "beta": beta})
