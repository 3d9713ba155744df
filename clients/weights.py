"""A verified release's weights as state_dict arrays: numpy, torch or a safetensors file.

Only what the ONNX graph holds comes back. A module's state_dict may also hold buffers
the graph never reads (BatchNorm's num_batches_tracked, a training counter): those are
not in a release, and load_release leaves them as the module has them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluice.clients.verify import VerifiedRelease, read_release
from sluice.models.artifact import StructureLimits, tensor_bytes
from sluice.models.manifest import (
    DATA_FILE,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    MODEL_FILE,
    ManifestRefused,
    listed_files,
    read_bounded,
    verify_signature,
)
from sluice.models.schema import Schema, TensorSpec, numpy_to_tensor

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = "manifest.json"  # as clients.sdk writes a pulled release
SIGNATURE_FILE = "manifest.sig"


def release_arrays(
    release_dir: Path,
    public_key: Ed25519PublicKey,
    structure_hash: str | None = None,
    limits: StructureLimits | None = None,
) -> dict[str, np.ndarray]:
    """state_dict name -> array of every weight of a release, after `sluice verify`'s checks.

    release_dir holds model.onnx (and model.onnx.data when the signed manifest lists it),
    manifest.json and manifest.sig; structure_hash pins the graph as in verify_release.
    Names, shapes and dtypes are the signed manifest's "weights", in its order. Raises
    ManifestRefused when the release does not verify; the arrays are read from the bytes
    that were hashed, never from the files a second time. Memory: the release's files
    plus one copy of the weights (each array owns its aligned, writable values).
    """
    return _read(release_dir, public_key, structure_hash, limits)[2]


def load_release(
    module: torch.nn.Module,
    release_dir: Path,
    public_key: Ed25519PublicKey,
    structure_hash: str | None = None,
    strict: bool = True,
    limits: StructureLimits | None = None,
) -> dict[str, Any]:
    """Load a verified release's weights into module; returns the verified manifest.

    strict: every tensor of the release must be in the module with the same shape and
    dtype, and the module may lack a value only for an integer buffer the graph does not
    use (BatchNorm's num_batches_tracked, a step counter: they keep their values) and for
    the other names of a tied parameter (loaded once, through its first name); anything
    else raises ValueError before the module is changed.
    Not strict: torch's load_state_dict(strict=False) rules (shapes must still match).
    """

    doc, _, arrays = _read(release_dir, public_key, structure_hash, limits)
    tensors = {name: numpy_to_tensor(a) for name, a in arrays.items()}
    if strict:
        own = module.state_dict()
        for name, tensor in tensors.items():
            if name not in own:
                raise ValueError(f"tensor {name!r} of the release is not in the module")
            if own[name].shape != tensor.shape or own[name].dtype != tensor.dtype:
                raise ValueError(
                    f"tensor {name!r}: the release has {tuple(tensor.shape)} {tensor.dtype}, "
                    f"the module {tuple(own[name].shape)} {own[name].dtype}"
                )
        tied = Schema.of(own).alias_of  # aliases share memory with a loaded tensor
        buffers = {name for name, _ in module.named_buffers()}
        missing = [
            n
            for n, t in own.items()
            if n not in tensors
            and n not in tied
            and not (n in buffers and not t.is_floating_point() and not t.is_complex())
        ]
        if missing:
            raise ValueError(
                f"the release lacks {len(missing)} tensors of the module, such as {missing[0]!r}"
            )
    module.load_state_dict(tensors, strict=False)
    return doc


def export_safetensors(
    release_dir: Path,
    public_key: Ed25519PublicKey,
    out: Path,
    structure_hash: str | None = None,
    limits: StructureLimits | None = None,
) -> dict[str, Any]:
    """Write a verified release's weights to out as safetensors; returns the manifest.

    Metadata: model, version, structure_hash and manifest_sha256 (of manifest.json as
    signed). Written to a temporary file beside out and renamed into place: out is
    either the whole file or untouched, and untouched whenever the release is refused.
    """
    from safetensors.numpy import save_file

    doc, manifest_sha256, arrays = _read(release_dir, public_key, structure_hash, limits)
    metadata = {
        "model": str(doc["model"]),
        "version": str(doc["version"]),
        "structure_hash": str(doc["structure_hash"]),
        "manifest_sha256": manifest_sha256,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return doc


def _read(
    release_dir: Path,
    public_key: Ed25519PublicKey,
    pinned: str | None,
    limits: StructureLimits | None = None,
) -> tuple[dict[str, Any], str, dict[str, np.ndarray]]:
    """(verified manifest, sha256 of manifest.json, arrays)."""
    manifest_json = read_bounded(release_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest")
    signature = read_bounded(release_dir / SIGNATURE_FILE, MAX_SIGNATURE_BYTES, "signature")
    files = {MODEL_FILE: release_dir / MODEL_FILE}
    # As `sluice verify`: which files to read is a signed fact, checked before any is read.
    if DATA_FILE in listed_files(verify_signature(manifest_json, signature, public_key)):
        files[DATA_FILE] = release_dir / DATA_FILE
    release = read_release(
        manifest_json, signature, public_key, files, structure_hash=pinned, limits=limits
    )
    arrays = _arrays(release)
    return release.manifest, hashlib.sha256(manifest_json).hexdigest(), arrays


def _arrays(release: VerifiedRelease) -> dict[str, np.ndarray]:
    # The manifest's weights description passed verification (inspect_onnx matched the
    # file against it), so it is read here without the checks again.
    specs = [
        TensorSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in release.manifest["weights"]
    ]
    spans: dict[str, tuple[int, int]] = {}
    if DATA_FILE in listed_files(release.manifest):  # end to end, in the manifest's order
        pos = 0
        for spec in specs:
            spans[spec.name] = (pos, pos + tensor_bytes(spec))
            pos += tensor_bytes(spec)
        buffer = release.data
    else:
        spans = {r.name: (r.start, r.end) for r in release.ranges}
        buffer = release.model
    arrays = {}
    for spec in specs:
        start, end = spans.get(spec.name, (0, -1))
        if end - start != tensor_bytes(spec) or end > len(buffer):  # verified: never, but cheap
            raise ManifestRefused(f"tensor {spec.name!r}: no {tensor_bytes(spec)}-byte value")
        values = np.frombuffer(buffer[start:end], dtype=spec.np_dtype)
        arrays[spec.name] = values.reshape(spec.shape).copy()
    return arrays
