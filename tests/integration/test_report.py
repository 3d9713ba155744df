"""`sluice report` from a real run: the page renders, embeds its plots, escapes what trainers
sent, and every plotted number is the stored one."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from sluice.clients.sdk import TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.report import NoData, load, write_report
from sluice.gateway.report.plots import Plot, figures, size_unit
from sluice.gateway.report.series import build, metric_series
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import wait_for_round

TRAINERS = ["shanghai-01", "shanghai-02", "beijing-01", "chengdu-01"]
ROUNDS = 3
HOSTILE_LOSS = "</script><script>alert(1)</script>$\\frac{_loss"  # plotted: a "loss"
HOSTILE = '<img src=x onerror="alert(2)">'  # only in the metrics table
OUTLIER = (2, "chengdu-01")  # this trainer's update is scaled 100x in this round


def _losses(round_no: int, i: int) -> dict[str, float]:
    return {
        "holdout_loss": 2.0 / round_no + 0.125 * i,
        "train_loss": 1.5 / round_no + 0.0625 * i,
        HOSTILE_LOSS: float(i),
        HOSTILE: 1.0,
    }


def _payload(schema: Schema, round_no: int, i: int) -> bytes:
    payload = random_delta(schema, seed=10 * round_no + i)
    if (round_no, TRAINERS[i]) != OUTLIER:
        return payload
    arrays = schema.views(payload)
    return schema.flatten({k: v * 100 if v.dtype.kind == "f" else v for k, v in arrays.items()})


def _norm(schema: Schema, payload: bytes) -> float:
    arrays = schema.views(payload)
    return math.sqrt(
        sum(
            float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values() if v.dtype.kind == "f"
        )
    )


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, tiny_schema: Schema
) -> Iterator[tuple[Running, dict[str, float]]]:
    """Three DP rounds of four trainers in three regions; the gateway keeps running.
    Returns it and each update id's norm as pushed."""
    running = start_gateway(
        tmp_path_factory.mktemp("report") / "gw",
        template_cache,
        quorum=len(TRAINERS),
        dp_noise_multiplier=1.0,
        dp_clipping_norm=0.05,
        dp_max_epsilon=8.0,  # 4.73, 7.08, then past it: the third release is refused
    )
    norms = {}
    with TrainerClient(running.endpoints.internal) as client:
        for round_no in range(1, ROUNDS + 1):
            for i, trainer in enumerate(TRAINERS):
                payload = _payload(tiny_schema, round_no, i)
                update_id = f"{trainer}-r{round_no}"
                client.push_update(
                    model=TINY,
                    round_no=round_no,
                    base_version=round_no - 1,
                    schema_hash=tiny_schema.hash,
                    trainer=trainer,
                    region=trainer.split("-")[0],
                    num_examples=10 * (i + 1),
                    payload=payload,
                    metrics=_losses(round_no, i),
                    update_id=update_id,
                )
                norms[update_id] = _norm(tiny_schema, payload)
            wait_for_round(client, round_no + 1)
    yield running, norms
    running.gateway.stop()


def _expected_means(metric: str) -> dict[str, list[tuple[int, float]]]:
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for round_no in range(1, ROUNDS + 1):
        for i, trainer in enumerate(TRAINERS):
            groups[trainer.split("-")[0]][round_no].append(_losses(round_no, i)[metric])
    return {
        region: [(r, sum(v) / len(v)) for r, v in sorted(by_round.items())]
        for region, by_round in sorted(groups.items())
    }


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        (self.scripts if self._in_script else self.text).append(data)


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_the_page_renders_from_a_running_gateway_and_escapes_trainer_strings(
    run: tuple[Running, dict[str, float]], tmp_path: Path
) -> None:
    running, _ = run
    path = write_report(running.data_dir, TINY, tmp_path / "out")  # the gateway still runs
    assert path == tmp_path / "out" / "index.html"
    page = _page(path)
    images = [a["src"] or "" for tag, a in page.tags if tag == "img"]
    # two losses (and the hostile one), norms, epsilon, release sizes, timings
    assert len(images) == 7
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    # One script element, inert data; nothing a trainer sent became markup.
    scripts = [a for tag, a in page.tags if tag == "script"]
    assert scripts == [{"type": "application/json", "id": "series"}]
    assert all("onerror" not in a for _, a in page.tags)
    text = "".join(page.text)
    assert HOSTILE in text and HOSTILE_LOSS in text  # shown, as text
    raw = path.read_text()
    assert "<script>alert" not in raw and "<img src=x" not in raw
    assert "refused" in text and "epsilon" in text


def test_the_plotted_numbers_are_the_stored_ones(
    run: tuple[Running, dict[str, float]], tmp_path: Path
) -> None:
    running, pushed_norms = run
    data = load(running.data_dir, TINY)
    series = build(data)
    # Loss: per region per round, the mean of what the region's trainers pushed.
    for metric in ("holdout_loss", "train_loss", HOSTILE_LOSS):
        got = metric_series(data, metric)
        want = _expected_means(metric)
        assert got.region_means.keys() == want.keys()
        for region, points in want.items():
            assert _flat(got.region_means[region]) == pytest.approx(_flat(points))
        assert len(got.points) == ROUNDS * len(TRAINERS)
    assert [s.metric for s in series.loss] == ["holdout_loss", "train_loss", HOSTILE_LOSS]

    # Norms: one per update and round, as pushed; screening flagged the 100x one.
    assert {p.update_id: p.norm for p in series.norms} == pytest.approx(pushed_norms)
    flagged = {(p.round, p.trainer) for p in series.norms if p.flagged}
    assert flagged == {OUTLIER}

    # Epsilon and releases: what the audit log and the releases table hold.
    closed = {e.subject: e.detail for e in running.gateway.store.audit_entries("round.closed")}
    stored_eps = [closed[f"{TINY}/round/{r}"]["dp"]["epsilon"] for r in range(1, ROUNDS + 1)]  # type: ignore[index]
    assert [p.epsilon for p in series.epsilon] == stored_eps
    assert [p.released for p in series.epsilon] == [True, True, False]
    rows = {r.version: r for r in running.gateway.store.list_releases(TINY)}
    for p in series.releases:
        assert p.published == (p.version in rows)
        assert p.total_bytes == (sum(f.size for f in rows[p.version].files) if p.published else 0)
        if p.published:
            assert {"fold", "write", "parity", "guard", "sync"} <= set(p.stages_s)

    # What the figures drew is the series, and so is the page's JSON block.
    plots = {p.key: p for p in figures(series, max_epsilon=8.0)}
    loss = _axes(plots["loss:holdout_loss"])
    lines = {ln.get_gid(): ln for ln in loss.get_lines()}
    for region, points in _expected_means("holdout_loss").items():
        line = lines[f"mean:{region}"]
        assert _floats(line.get_xdata()) == [r for r, _ in points]
        assert _floats(line.get_ydata()) == pytest.approx([v for _, v in points])
    dots = _offsets(loss, "points")
    want_dots = sorted((p.round, p.value) for p in series.loss[0].points)
    assert _flat(sorted(dots)) == pytest.approx(_flat(want_dots))
    assert _flat(_offsets(_axes(plots["norms"]), "norms:flagged")) == pytest.approx(
        [OUTLIER[0], pushed_norms[f"{OUTLIER[1]}-r{OUTLIER[0]}"]]
    )
    lines = {ln.get_gid(): ln for ln in _axes(plots["epsilon"]).get_lines()}
    assert _floats(lines["epsilon"].get_ydata()) == stored_eps
    assert _floats(lines["epsilon:budget"].get_ydata()) == [8.0, 8.0]
    released = [p.total_bytes for p in series.releases if p.published]
    unit, scale = size_unit(max(released))
    sizes = _axes(plots["release:size"])
    assert [h * scale for h in _heights(sizes, "sizes")] == pytest.approx(released)
    assert sizes.get_ylabel().startswith(unit)
    parity = _heights(_axes(plots["release:time"]), "stage:parity")
    assert parity == pytest.approx([p.stages_s.get("parity", 0.0) for p in series.releases])

    path = write_report(running.data_dir, TINY, tmp_path / "out")
    (block,) = _page(path).scripts
    doc = json.loads(block)
    assert doc["norms"] == [dataclasses.asdict(p) for p in series.norms]
    for metric, want in (("holdout_loss", _expected_means("holdout_loss")),):
        (got,) = [s for s in doc["loss"] if s["metric"] == metric]
        assert {r: _flat(v) for r, v in got["region_means"].items()} == {
            r: pytest.approx(_flat(v)) for r, v in want.items()
        }


def _flat(pairs: Iterable[Iterable[float]]) -> list[float]:
    return [float(x) for pair in pairs for x in pair]


def _floats(values: object) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _offsets(ax: Axes, gid: str) -> list[tuple[float, float]]:
    """The (x, y) points of the scatter plot with this gid."""
    (points,) = [c for c in ax.collections if c.get_gid() == gid]
    xy = np.asarray(points.get_offsets(), dtype=np.float64)
    return [(float(x), float(y)) for x, y in xy]


def _heights(ax: Axes, gid: str) -> list[float]:
    """The heights of the bars with this gid, left to right."""
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_gid() == gid]
    return [bar.get_height() for bar in sorted(bars, key=lambda b: b.get_x())]


def _axes(plot: Plot) -> Axes:
    assert plot.figure is not None, plot.notes
    (ax,) = plot.figure.axes
    return ax


def test_cli_writes_the_page_and_says_what_is_wrong_in_one_line(
    run: tuple[Running, dict[str, float]],
    tmp_path: Path,
    template_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running, _ = run
    out = tmp_path / "cli"
    args = ["report", "--data-dir", str(running.data_dir), "--model", TINY, "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")

    assert main([*args[:3], "--model", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no model 'nope'" in err and TINY in err and len(err.strip().splitlines()) == 1
    missing = ["report", "--data-dir", str(tmp_path / "none"), "--model", TINY, "--out", str(out)]
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err

    # A gateway that has not closed a round: the command has nothing to report (exit 1);
    # the function still writes a page that says so.
    fresh = start_gateway(tmp_path / "fresh", template_cache)
    try:
        empty = ["report", "--data-dir", str(fresh.data_dir), "--model", TINY, "--out", str(out)]
        assert main(empty) == 1
        assert "nothing to report" in capsys.readouterr().err
        page = _page(write_report(fresh.data_dir, TINY, tmp_path / "empty"))
        text = "".join(page.text)
        assert "No round has closed" in text and "DP is off" in text
        assert "No trainer reported" in text
    finally:
        fresh.gateway.stop()
    with pytest.raises(NoData):
        load(tmp_path / "fresh", "nope")
