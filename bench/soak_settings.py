"""What the soak runs (model, retention, trainers' pace) and how it judges the run."""

from __future__ import annotations

import re

MODEL = "drivenet-tiny"
KEEP_ROUNDS = 2
KEEP_VERSIONS = 2
# The gateway's handler threads per listener: every trainer's one call at a time, the
# sampler's, and its reserved 4 (refusals stay prompt). With its default 32 (28 calls
# admitted), 64 trainers polling on a loaded 2-core machine pile up past 28 calls whenever
# the gateway stalls for a second, and the listener refuses the rest with UNAVAILABLE: its
# back-pressure, which the SDK retries and the soak counts as errors (--workers 32).
EXTRA_WORKERS = 16
MIN_TRAINERS = 2  # k: a release needs this many distinct trainers (every round has all)
REGIONS = ("shanghai", "beijing", "shenzhen", "chengdu")
TRAIN_S = (0.5, 2.0)  # "local training" between reading a round and pushing: spreads pushes
POLL_S = (0.5, 1.0)  # between GetRound calls while waiting for the next round
WARMUP_FRACTION, WARMUP_MAX_S = 0.2, 120.0
RSS_GROWTH = 0.05  # allowed growth of the gateway's RSS from the end of warm-up to the end
# Open files, after warm-up: the lowest count of each tenth of the run within FD_SLACK.
# A sample can land on files that come and go (a push's spool file, a pull's blob: up to
# 14 in a sample of the 10-minute run); a leak raises the floor.
FD_SLACK = 4
# Threads come and go too (a close's fold workers, gRPC's pollers: up to 15 in a sample),
# and gRPC's handler pool grows on a pile-up of calls, never shrinks, in steps at any time
# (47 -> 70 -> 76 threads in the 10-minute run; 48 -> 63 in the middle of a 1-minute one):
# not flat, but bounded, since each trainer has at most one call open. So: every sample
# <= the idle count + trainers + 1 (the sampler) + TRANSIENT_THREADS, and the lowest
# counts of the last three tenths within THREAD_SLACK (no growth at the end).
TRANSIENT_THREADS = 16
THREAD_SLACK = 4
STALL_S = 60.0  # no round closed this long: reported as an error (a stuck quorum)
# A push that raced the round's close (read open, arrived after the quorum closed it).
RACE = re.compile(r"round \d+ of '[^']+' is (aggregating|closed|failed)")
