"""A release of a model over 2 GiB: the two-file layout, written, loaded and checked for parity."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.large_release import LARGE_MODEL, module_from_payload, write_random_payload
from sluice.gateway.export.parity import max_output_diff
from sluice.gateway.export.refresh import write_release_files
from sluice.gateway.export.template import build_template
from sluice.models import registry
from sluice.models.manifest import DATA_FILE, MODEL_FILE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SLUICE_SLOW") != "1",
        reason="about a minute, ~7 GB of RAM and ~5 GB of disk: set SLUICE_SLOW=1 to run",
    ),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path)  # pytest keeps recent tmp_paths; not 2 GiB files each


def test_release_over_2_gib_loads_and_matches_torch(workdir: Path) -> None:
    entry = registry.get(LARGE_MODEL)
    t = build_template(entry)
    assert t.data_file == DATA_FILE  # chosen by size, not forced
    schema = write_random_payload(entry, workdir / "update.bin", seed=7)
    files = write_release_files(t, schema, workdir / "update.bin", workdir / "release")
    sizes = {name: size for name, size, _ in files}
    assert sizes[DATA_FILE] == t.data_file_bytes > 2 << 30
    assert sizes[MODEL_FILE] < 1 << 20  # the graph alone
    assert (workdir / "release" / MODEL_FILE).read_bytes() == t.data
    module = module_from_payload(entry, schema, workdir / "update.bin")
    (workdir / "update.bin").unlink()  # the module holds the weights now; free the disk
    assert max_output_diff(workdir / "release" / MODEL_FILE, entry, module) <= 1e-4
