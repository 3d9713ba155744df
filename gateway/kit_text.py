"""What a kit says to its holder: README.txt and run.sh, from its kit.json document."""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Mapping
from typing import Any

_WIDTH = 88

_SCRIPT_HEAD = """#!/bin/sh
# {who}: a ready command line with this kit.
# Extra arguments are passed on to sluice: a later --model, --out or --rounds wins.
set -eu
KIT=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
"""

_TRAINER = """\
Gateway (internal listener): {internal}. Install: pip install 'sluicegate[gateway]'.

Check the setup with the simulated trainer (synthetic clips):
|  ./run.sh --rounds 1

Your own training loop, with the Python SDK (the README's "Regional trainer" section):
|  from pathlib import Path
|  from sluice.clients.kit import load_kit
|  from sluice.clients.sdk import TrainerClient
|
|  kit = load_kit(Path("/path/to/this/kit"))  # checks that the files belong together
|  with TrainerClient(kit.endpoint("internal"), identity=kit.identity) as client:
|      info = client.round("drivenet")
|      ...  # pull_global, train, push_update(trainer="{name}", region="{region}", ...)

You may push only as {name}, for region {region}: the gateway refuses anything else. \
The kit also works as `--pki KIT --identity {name}` (KIT: this directory) with any sluice \
command.
"""

_OPERATOR = """\
Gateway (internal listener): {internal}. Install: pip install sluicegate.

KIT is this directory:
|  ./run.sh     # sluice status: models, rounds, versions
|  sluice close-round --target {internal} --model drivenet --round N --pki KIT --identity {name}
|  sluice revoke --target {internal} --cert CERT.pem --reason WHY --pki KIT --identity {name}

This kit issues nothing: certificates and kits are made where the CA key is, in the PKI \
directory the kits were cut from.
"""

_READER = """\
Gateway (egress listener): {egress}. Install: pip install sluicegate (no torch needed).

The gateway signs every release with its own Ed25519 key. {release} Confirm the key id \
with the operator by a second channel; `sluice verify` prints the id a release was signed \
with.

KIT is this directory:
|  ./run.sh                          # the newest drivenet release into ./drivenet-latest
|  ./run.sh --model NAME --out DIR   # another model, another place
|  sluice verify DIR/model.onnx DIR/manifest.json --public-key KIT/release-signing.pub
|  sluice export-weights DIR --public-key KIT/release-signing.pub --out weights.safetensors

run.sh pins each model's structure hash in KIT/pins.json at its first pull and refuses a \
release of another structure later.
"""

_RELEASE_HERE = "Its public half is in this kit: release-signing.pub, key id {release_key_id}."
_RELEASE_ABSENT = (
    "Its public half is not in this kit: the gateway writes it to "
    "<data dir>/keys/release-signing.pub at its first start. Get it from the operator out "
    "of band and put it in this directory as release-signing.pub."
)


def _who(doc: Mapping[str, Any]) -> str:
    region = f", region {doc['region']}" if doc.get("region") else ""
    return f"{doc['principal']} ({doc['role']}{region})"


def run_script(doc: Mapping[str, Any]) -> str:
    """run.sh for this principal's role: one `exec sluice ...` line, or why there is none."""
    name, role, endpoints = doc["principal"], doc["role"], doc["endpoints"]
    head = _SCRIPT_HEAD.format(who=_who(doc))
    q = shlex.quote
    if role == "operator":
        line = (
            f'sluice status --target {q(endpoints["internal"])} --pki "$KIT" --identity {q(name)}'
        )
    elif role == "reader":
        head += (
            '[ -f "$KIT/release-signing.pub" ] || {\n'
            '    echo "put the gateway\'s release-signing.pub (from the operator) in $KIT" >&2\n'
            "    exit 2\n"
            "}\n"
        )
        line = (
            f'sluice pull --egress {q(endpoints["egress"])} --pki "$KIT" --identity {q(name)} '
            '--public-key "$KIT/release-signing.pub" --pin-file "$KIT/pins.json" '
            "--model drivenet --out drivenet-latest"
        )
    elif name == f"{doc['region']}-01":  # the simulator names its one trainer <region>-01
        line = (
            f"sluice simulate --target {q(endpoints['internal'])} --trainers 1 "
            f'--regions {q(doc["region"])} --pki "$KIT"'
        )
    else:
        return head + (
            f'echo "sluice simulate names its trainers <region>-01, not {name}: train with '
            'the SDK and this kit (README.txt)" >&2\nexit 2\n'
        )
    return f'{head}exec {line} "$@"\n'


def _render(text: str) -> str:
    """Paragraphs wrapped to _WIDTH; lines starting with '|' kept verbatim (commands)."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.splitlines()
        prose = [line for line in lines if not line.startswith("|")]
        if prose:
            out.append(
                textwrap.fill(
                    " ".join(prose), _WIDTH, break_long_words=False, break_on_hyphens=False
                )
            )
        verbatim = [line[1:] for line in lines if line.startswith("|")]
        if verbatim:
            out[-1:] = ["\n".join(out[-1:] + verbatim)] if prose else ["\n".join(verbatim)]
    return "\n\n".join(out) + "\n"


def readme(doc: Mapping[str, Any]) -> str:
    """README.txt: who the kit is for, what is in it, what to run."""
    name, role = doc["principal"], doc["role"]
    files = [
        ("ca.pem", "the CA certificate: the gateway's listeners are checked against it"),
        (f"clients/{name}.pem", f"your certificate: {doc['spiffe_id']}"),
        (f"clients/{name}.key", "your private key: only you may read it (0600)"),
        ("kit.json", "principal, role, endpoints, CA fingerprint, validity"),
        ("run.sh", "a ready command line for your role"),
    ]
    if "release_key_id" in doc:
        files.append(("release-signing.pub", "the gateway's release-signing public key"))
    width = max(len(path) for path, _ in files)
    listing = "\n".join(f"|  {path:<{width}}  {what}" for path, what in files)
    release = _RELEASE_HERE if "release_key_id" in doc else _RELEASE_ABSENT
    values = {**doc, **doc["endpoints"], "name": name, "release": release.format(**doc)}
    body = {"trainer": _TRAINER, "operator": _OPERATOR, "reader": _READER}[role]
    text = (
        f"Sluice kit for {_who(doc)}\n"
        f"|  certificate serial  {doc['serial']}\n"
        f"|  valid until         {doc['not_after']}\n"
        f"|  CA sha256           {doc['ca_sha256']}\n"
        "|  (the gateway records the same CA sha256 in <data dir>/trusted-ca.sha256)\n\n"
        "Keep the files together and as they are named: the commands find them by name.\n"
        f"{listing}\n\n"
        f"{body.format(**values)}\n"
        "If the key leaks or the host is lost, tell the operator: they revoke this certificate "
        "by its serial and hand you a new kit.\n"
    )
    return _render(text)
