"""Plain values the domain passes around: update headers, round state, versions, releases."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# Used with fullmatch: `$` would also accept a trailing newline.
UPDATE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Every integer the gateway stores or signs stays at most this: SQLite holds signed 64-bit
# integers, and the manifest's canonical JSON (RFC 8785) refuses any beyond 2**53 - 1.
MAX_SAFE_INT = (1 << 53) - 1


class RoundState(StrEnum):
    OPEN = "open"
    AGGREGATING = "aggregating"  # closed to pushes, version being computed
    CLOSED = "closed"
    # Could not be folded, for a reason that would not go away (Round.failure says which);
    # the next round opened on the same base version.
    FAILED = "failed"


@dataclass(frozen=True)
class UpdateHeader:
    update_id: str
    trainer: str
    region: str
    model: str
    round: int
    base_version: int
    num_examples: int
    schema_hash: str
    payload_sha256: str
    payload_bytes: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Round:
    model: str
    round: int
    base_version: int
    state: RoundState
    opened_ms: int
    deadline_ms: int
    accepted: int = 0  # distinct trainers with a committed update
    version: int | None = None  # the version this round produced, once closed
    failure: str = ""  # why it failed, when FAILED


@dataclass(frozen=True)
class CommittedUpdate:
    seq: int  # commit order; aggregation folds in this order
    update_id: str
    trainer: str
    region: str
    round: int
    num_examples: int
    payload_sha256: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_version: int = 0  # the version it was trained from


@dataclass(frozen=True)
class Version:
    model: str
    version: int
    round: int  # 0 for weights no round produced (the initial ones, an import)
    weights_sha256: str
    num_trainers: int
    num_regions: int
    num_examples: int
    created_ms: int
    # When retention removed its weights file (and optimizer state); the row stays.
    removed_ms: int | None = None


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    model: str
    version: int
    round: int
    created_ms: int
    num_trainers: int
    files: tuple[ReleaseFile, ...]
    manifest_json: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class PushResult:
    update_id: str
    created: bool  # False: the id was already committed, nothing counted twice
    round: int
    accepted: int


@dataclass(frozen=True)
class PublishOutcome:
    release: Release | None
    refused: str = ""  # why no release was published; empty when one was
    stages: tuple[tuple[str, float], ...] = ()  # (stage, seconds) of a published release


@dataclass(frozen=True)
class ClosedRound:
    version: Version
    released: bool
    refused: str = ""  # the guard's or the policy's reason when nothing was released
    already_closed: bool = False  # an earlier close (perhaps before a restart) produced it
