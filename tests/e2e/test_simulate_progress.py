"""`sluice simulate` tells what is happening: certificates checked first, a line per trainer
per round as it happens, the first error at once with its cause, Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints
import pytest

from sluice.clients import progress
from sluice.clients.progress import Board
from sluice.clients.simulate import MissingCertificates, SimulationConfig, plan_trainers, simulate
from sluice.clients.workers import Failure, describe
from sluice.gateway.pki import init_pki
from sluice.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, start_gateway

SIMULATE = [sys.executable, "-m", "sluice.gateway.cli", "simulate"]
SMALL = ["--model", TINY, "--clips", "64", "--epochs", "1"]
ROUND_LINE = re.compile(
    r"^round (\d+) (\S+) \((\w+)\) +held-out loss [\d.]+ -> [\d.]+, 64 examples, "
    r"trained [\d.]+s, pushed [\d.]+ MB in [\d.]+s$"
)


@dataclass
class Line:
    at: float  # time.monotonic() when the test read it
    text: str
    running: bool  # the simulate process had not exited yet


@dataclass
class Simulation:
    """`sluice simulate` in a session of its own, its output read line by line as it comes,
    and every process it started remembered."""

    proc: subprocess.Popen[str]
    out: list[Line] = field(default_factory=list)
    err: list[Line] = field(default_factory=list)
    children: set[psutil.Process] = field(default_factory=set)
    readers: list[threading.Thread] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def start(cls, *args: str) -> Iterator[Simulation]:
        proc = subprocess.Popen(
            [*SIMULATE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # killpg(SIGINT) then reaches it as Ctrl-C would
        )
        sim = cls(proc)
        for stream, lines in ((proc.stdout, sim.out), (proc.stderr, sim.err)):
            reader = threading.Thread(target=sim._read, args=(stream, lines), daemon=True)
            reader.start()
            sim.readers.append(reader)
        try:
            yield sim
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed test left running
            proc.wait()
            for reader in sim.readers:
                reader.join()
            for stream in (proc.stdout, proc.stderr):
                assert stream is not None
                stream.close()

    def _read(self, stream: io.TextIOBase, lines: list[Line]) -> None:
        for text in stream:
            lines.append(Line(time.monotonic(), text.rstrip("\n"), self.proc.poll() is None))

    def texts(self, which: str = "out") -> list[str]:
        return [line.text for line in (self.out if which == "out" else self.err)]

    def wait_for(self, predicate: object, timeout_s: float) -> None:
        """Until predicate() holds, noting the process's children meanwhile."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self._note_children()
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out; stdout {self.texts()}, stderr {self.texts('err')}")
            time.sleep(0.05)
        self._note_children()

    def _note_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):  # it has just exited
            self.children.update(psutil.Process(self.proc.pid).children(recursive=True))

    def finish(self, timeout_s: float) -> int:
        self.wait_for(lambda: self.proc.poll() is not None, timeout_s)
        for reader in self.readers:
            reader.join(10)  # they take the last lines
        return self.proc.returncode

    def assert_no_processes_left(self) -> None:
        assert len(self.children) >= 1, "no child process was ever seen"
        _, alive = psutil.wait_procs(list(self.children), timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"


@pytest.fixture
def running(tmp_path: Path, template_cache: Path) -> Iterator[Running]:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=3)
    yield running
    running.gateway.stop()


def test_a_missing_certificate_fails_at_once_with_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = init_pki(tmp_path / "pki", trainers=[("shanghai-01", "shanghai")]).directory
    started = time.monotonic()
    done = subprocess.run(
        [*SIMULATE, "--target", "127.0.0.1:9", "--pki", str(pki), "--trainers", "2", *SMALL],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert time.monotonic() - started < 5
    assert done.returncode == 2
    assert done.stdout == ""  # not even the line that announces the trainer processes
    (line,) = done.stderr.splitlines()
    assert "clients/beijing-01.pem, clients/beijing-01.key" in line
    assert f"sluice init {pki} --trainer beijing-01:beijing`" in line
    assert "shanghai-01" not in line

    # The library refuses before it starts a single process.
    def no_processes(*args: object) -> object:
        raise AssertionError("a process was started")

    monkeypatch.setattr("multiprocessing.get_context", no_processes)
    config = SimulationConfig(target="127.0.0.1:9", model=TINY, pki_dir=pki)
    with pytest.raises(MissingCertificates, match="beijing-01"):
        simulate(config, plan_trainers(2, ["shanghai", "beijing"]))


def test_a_line_per_trainer_per_round_arrives_as_it_happens(running: Running) -> None:
    args = ["--target", running.endpoints.internal, "--insecure", "--trainers", "3"]
    with Simulation.start(*args, "--rounds", "3", *SMALL) as sim:
        assert sim.finish(timeout_s=120) == 0, sim.texts("err")
        sim.assert_no_processes_left()
    rounds: dict[int, list[Line]] = {}
    for line in sim.out:
        if match := ROUND_LINE.match(line.text):
            rounds.setdefault(int(match[1]), []).append(line)
    assert sorted(rounds) == [1, 2, 3]
    assert all(len(lines) == 3 for lines in rounds.values())
    firsts = [ROUND_LINE.match(x.text) for x in rounds[1]]
    assert {(m[2], m[3]) for m in firsts if m} == {
        ("shanghai-01", "shanghai"), ("beijing-01", "beijing"), ("shenzhen-01", "shenzhen")
    }  # fmt: skip
    # Round 1's lines were read while the simulation still ran, well before round 3's: they
    # are printed (and flushed into a pipe) as each push is acknowledged, not at the end.
    assert all(line.running for line in rounds[1])
    assert max(x.at for x in rounds[1]) < min(x.at for x in rounds[3]) - 0.2
    assert sim.texts()[-1].startswith("3 rounds x 3 trainers in ")
    assert not any("Traceback" in text for text in sim.texts("err"))


def test_a_grpc_error_in_a_trainer_shows_at_once_with_its_status_and_stops_the_others(
    tmp_path: Path, template_cache: Path
) -> None:
    # beijing-01's certificate binds it to the shanghai region: its push is refused
    # (PERMISSION_DENIED) while the other two, having pushed round 1, wait for a round that
    # cannot close without it (quorum 3), up to round_timeout_s (10 minutes).
    trainers = [
        ("shanghai-01", "shanghai"),
        ("beijing-01", "shanghai"),
        ("shenzhen-01", "shenzhen"),
    ]
    pki = init_pki(tmp_path / "pki", trainers=trainers).directory
    running = start_gateway(
        tmp_path / "gw", template_cache, quorum=3, min_trainers=3,
        insecure_loopback=False, pki_dir=pki,
    )  # fmt: skip
    args = ["--target", running.endpoints.internal, "--pki", str(pki), "--trainers", "3"]
    try:
        with Simulation.start(*args, "--rounds", "2", *SMALL) as sim:
            assert sim.finish(timeout_s=60) == 1
            sim.assert_no_processes_left()
    finally:
        running.gateway.stop()
    err = sim.texts("err")
    failure, stopped = [t for t in err if t.startswith("sluice simulate: ")]
    assert "trainer beijing-01 (beijing) failed (round 1: pushing" in failure
    assert "PERMISSION_DENIED: " in failure and "shanghai" in failure
    assert stopped == "sluice simulate: stopped 2 other trainers"
    assert not any(word in "\n".join(err) for word in ("Traceback", "pickle", "TypeError"))


def test_ctrl_c_stops_every_trainer_and_exits_130_without_a_traceback(running: Running) -> None:
    args = ["--target", running.endpoints.internal, "--insecure", "--trainers", "3"]
    with Simulation.start(*args, "--rounds", "1000", *SMALL) as sim:
        # Mid-run: a round's line, so every trainer process is up and busy (a heartbeat
        # can come while a loaded machine is still starting them).
        sim.wait_for(lambda: any(t.startswith("round ") for t in sim.texts()), 120)
        os.killpg(sim.proc.pid, signal.SIGINT)  # what Ctrl-C sends: every process of the group
        sent = time.monotonic()
        assert sim.finish(timeout_s=60) == 130
        # Prompt, not instant: the trainers finish the step they are in (a loaded machine).
        assert time.monotonic() - sent < 30
        sim.assert_no_processes_left()
    assert sim.texts("err")[-1] == "interrupted; 3 trainers stopped"
    assert not any("Traceback" in t for t in sim.texts() + sim.texts("err"))


def test_a_grpc_error_crosses_processes_as_plain_data() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRound(trainer_pb2.GetRoundRequest(model=TINY), timeout=5)
    with pytest.raises(TypeError, match="pickle"):  # what used to reach the parent
        pickle.dumps(caught.value)
    error, details = describe(caught.value)
    assert error == "UNAVAILABLE" and "127.0.0.1:1" in details
    failure = Failure("a-01", error, details, last="round 2: pushing")
    assert pickle.loads(pickle.dumps(failure)) == failure


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_board_prints_lines_and_a_heartbeat_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.3)
    out = io.StringIO()
    with Board(["a-01", "b-01"], out) as board:
        board.line("round 1 a-01 done")
        board.update("b-01", "round 1: training 3/8", 5, 20)
        time.sleep(1.2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1 a-01 done"
    assert any("a-01 starting; b-01 round 1: training 3/8" in line for line in lines[1:])


def test_board_draws_bars_on_a_terminal_under_its_lines() -> None:
    out = _Terminal()
    with Board(["a-01"], out) as board:
        board.update("a-01", "round 1: training 3/8", 5, 20)
        board.line("round 1 a-01 done")
        time.sleep(0.3)
    text = out.getvalue()
    assert "round 1 a-01 done" in text
    assert "round 1: training 3/8" in text  # the row's status, drawn by rich
    assert "\x1b[" in text  # cursor movement: a live view, not plain lines
