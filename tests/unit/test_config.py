"""Settings: TOML, then SLUICE_* environment, then flags; strategies per model from tables."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.config import RANGES, Config, check_ranges, check_settings, load_config
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.core.strategies.optimizers import FedAdam


def test_toml_env_and_overrides_layer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(
        """
[gateway]
models = ["drivenet", "drivenet-tiny"]
quorum = 5
dp_noise_multiplier = 1.1

[gateway.strategies.drivenet]
name = "FedAdam"
eta = 0.01
"""
    )
    config = load_config(path, {"min_trainers": 4}, environ={"SLUICE_QUORUM": "7"})
    assert config.models == ("drivenet", "drivenet-tiny")
    assert (config.quorum, config.min_trainers, config.dp_noise_multiplier) == (7, 4, 1.1)
    strategy = build_strategy(config.strategies["drivenet"])
    assert isinstance(strategy, FedAdam) and strategy.eta == 0.01


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("[gateway]\nquorom = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'quorom'"):
        load_config(path, environ={})
    with pytest.raises(ValueError, match="at least 1"):
        load_config(None, {"quorum": 0}, environ={})


# Every numeric setting has a range, and a value that is not a number of its kind, or is
# outside that range, is refused with the setting's name: however it arrives (TOML, the
# environment, flags) and however the Config was made (Gateway checks it again).

NUMERIC = {
    f.name: f.default
    for f in fields(Config)
    if isinstance(f.default, int | float) and not isinstance(f.default, bool)
}
WHOLE = sorted(name for name, default in NUMERIC.items() if isinstance(default, int))


def test_every_numeric_setting_has_a_range_its_default_lies_in() -> None:
    assert set(NUMERIC) == set(RANGES)
    check_settings(Config())


not_whole = st.one_of(
    st.floats().filter(lambda x: not x.is_integer() if math.isfinite(x) else True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.text(max_size=20).filter(lambda t: not re.fullmatch(r"[+-]?[0-9]+", t.strip())),
    st.from_regex(r"\A[+-]{2,3}[0-9]{1,3}\Z"),
    st.none().map(lambda _: {"a": 1}),
)


@given(name=st.sampled_from(WHOLE), value=not_whole)
@settings(max_examples=200, deadline=None)
def test_a_whole_number_setting_refuses_anything_else_by_name(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"setting '{name}'"):
        load_config(None, {name: value}, environ={})


@given(
    name=st.sampled_from(sorted(RANGES)),
    past=st.one_of(st.just(math.nan), st.just(math.inf), st.floats(1e-9, 1e30)),
    below=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_a_value_outside_its_range_is_refused_by_name(name: str, past: float, below: bool) -> None:
    least, most = RANGES[name]
    value = past
    if math.isfinite(past):  # a step that still counts beside a bound as large as 3.4e38
        value = least - max(past, abs(least) * 1e-9) if below else most + max(past, most * 1e-9)
    if isinstance(NUMERIC[name], int):
        if not math.isfinite(value):
            return  # not a whole number at all: the test above
        value = math.floor(value) if below else math.ceil(value)
        if least <= value <= most:
            return
    with pytest.raises(ValueError, match=f"setting '{name}'"):
        load_config(None, {name: value}, environ={})
    with pytest.raises(ValueError, match=f"setting '{name}'"):
        check_settings(Config().replace(**{name: value}))


@given(
    name=st.sampled_from(sorted(RANGES)),
    digits=st.integers(309, 400),  # past every range's ends, and past a float's
    sign=st.sampled_from([-1, 1]),
)
@settings(max_examples=100, deadline=None)
def test_an_integer_of_any_size_is_refused_by_name_not_by_a_crash(
    name: str, digits: int, sign: int
) -> None:
    with pytest.raises(ValueError, match=f"setting '{name}'"):
        load_config(None, {name: sign * 10**digits}, environ={})


def test_a_range_s_own_ends_are_accepted() -> None:
    for name, (least, most) in RANGES.items():
        for end in (least, most):
            value = int(end) if isinstance(NUMERIC[name], int) else float(end)
            check_ranges(Config().replace(**{name: value}))


def test_environment_strings_are_parsed_strictly() -> None:
    config = load_config(None, environ={"SLUICE_QUORUM": " 7 ", "SLUICE_FEDBUFF": "on"})
    assert (config.quorum, config.fedbuff) == (7, True)
    for env, named in [
        ({"SLUICE_QUORUM": "7.5"}, "quorum"),
        ({"SLUICE_QUORUM": "1e3"}, "quorum"),
        ({"SLUICE_FEDBUFF": "ture"}, "fedbuff"),
        ({"SLUICE_ROUND_SECONDS": "nan"}, "round_seconds"),
        ({"SLUICE_ROUND_SECONDS": "soon"}, "round_seconds"),
    ]:
        with pytest.raises(ValueError, match=f"setting '{named}'"):
            load_config(None, environ=env)


def test_a_gateway_refuses_a_setting_out_of_range_before_it_touches_its_data_dir(
    tmp_path: Path,
) -> None:
    from sluice.gateway.listeners import StartupError
    from sluice.gateway.server import Gateway

    for bad in ({"workers": 0}, {"round_seconds": math.nan}, {"max_chunk_bytes": 3 << 30}):
        with pytest.raises(StartupError, match=f"setting '{next(iter(bad))}'"):
            Gateway(Config(data_dir=tmp_path / "never").replace(**bad))
    with pytest.raises(StartupError, match="room for a third"):  # each in range, not together
        Gateway(Config(data_dir=tmp_path / "never").replace(workers=12, reserved_workers=4))
    assert not (tmp_path / "never").exists()
