"""The README's by-hand flow, run as written: operator -> gateway -> trainers -> global
team -> report. The commands are read from README.md itself (the block after the
`readme-flow` marker), so the test fails when the README and the CLI drift apart.

How the block is run: in a fresh directory; `.venv/bin/sluice` is this interpreter's
`python -m sluice.gateway.cli`; the fixed ports 7070/7071 become free ones (a developer's
own gateway may hold them) and the operations listeners pick their own; a command ending in
`&` starts in the background and the next one waits for its "sluice: internal" line;
`kill %1` stops it with SIGTERM, which must end it with status 0. Every other command
must exit 0, and no output may hold a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme-flow:"
SLUICE = [sys.executable, "-m", "sluice.gateway.cli"]


def flow_commands(text: str) -> list[str]:
    """The shell lines of the ```sh block right after the marker, continuations joined."""
    after = text[text.index(MARKER) :]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block is not None, "no ```sh block after the readme-flow marker"
    joined = block.group(1).replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_readme_flow_runs_as_written(tmp_path: Path) -> None:
    commands = flow_commands(README.read_text())
    assert commands[-1] == "kill %1" and commands[1].endswith("&")
    ports = {"7070": str(_free_port()), "7071": str(_free_port())}
    env = {
        **os.environ,
        "SLUICE_OPS_ADDRESS": "127.0.0.1:0",
        "SLUICE_HEALTH_ADDRESS": "127.0.0.1:0",
    }
    background: subprocess.Popen[str] | None = None
    served: list[str] = []
    outputs: list[str] = []
    try:
        for line in commands:
            for fixed, free in ports.items():
                line = line.replace(f"127.0.0.1:{fixed}", f"127.0.0.1:{free}")
            if line == "kill %1":
                assert background is not None
                background.send_signal(signal.SIGTERM)
                assert background.wait(timeout=60) == 0, "".join(served)
                continue
            words = shlex.split(line.removesuffix("&"), comments=True)
            assert words[0] == ".venv/bin/sluice", line
            argv = SLUICE + words[1:]
            if line.endswith("&"):
                background = subprocess.Popen(
                    argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
                ready = threading.Event()

                def read(
                    proc: subprocess.Popen[str] = background, ready: threading.Event = ready
                ) -> None:
                    assert proc.stdout is not None
                    for out in proc.stdout:
                        served.append(out)
                        if out.startswith("sluice: internal"):
                            ready.set()

                threading.Thread(target=read, daemon=True).start()
                assert ready.wait(180), "the gateway never served:\n" + "".join(served)
                continue
            done = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            outputs.append(done.stdout + done.stderr)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    finally:
        if background is not None:
            if background.poll() is None:
                background.kill()
                background.wait()
            if background.stdout is not None:
                background.stdout.close()
    for out in [*outputs, "".join(served)]:
        assert "Traceback" not in out
    assert (tmp_path / "release" / "model.onnx").is_file()
    assert any(out.startswith("OK: drivenet-tiny v1") for out in outputs)
    assert (tmp_path / "report" / "index.html").is_file()
    assert not (tmp_path / "kits" / "global-team" / "ca.key").exists()


@pytest.mark.parametrize("text", ["no marker here"])
def test_a_readme_without_the_block_fails_loudly(text: str) -> None:
    with pytest.raises(ValueError):
        flow_commands(text)
