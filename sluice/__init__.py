"""Sluice: a federated model-update gateway for a data-sovereign region.

Nothing leaves the region but signed releases through the egress listener, and that
includes what libraries send on their own. Found in their binaries and checked here:
onnxruntime 1.32 on Linux records usage events (device id, process, every session it
creates) in ~/.cache/Microsoft/DeveloperTools and uploads them over HTTPS to Microsoft's
collector when it can; Flower sends telemetry events; Ray reports usage statistics. Each
is turned off, for this process and every process it starts, before any of them is
imported by Sluice (this package is imported first), unless the environment already
says otherwise. tests/unit/test_no_phoning_home.py proves it for onnxruntime.
"""

import os

QUIET_LIBRARIES = {
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime (read when its environment is created)
    "FLWR_TELEMETRY_ENABLED": "0",  # Flower
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray
}
for _name, _value in QUIET_LIBRARIES.items():
    os.environ.setdefault(_name, _value)
