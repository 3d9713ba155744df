"""Key files: written atomically, never replaced by accident, a clear error when unusable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sluice.gateway import pki
from sluice.gateway.export.signing import PRIVATE_FILE, PUBLIC_FILE, Signer, SigningKeyError
from sluice.gateway.pki import (
    CertificateAuthority,
    PkiLayout,
    cert_serial,
    create_private_file,
    init_pki,
    issued_principals,
    key_matches_cert,
)


def test_a_kill_while_writing_the_signing_key_leaves_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"

    def killed(src: object, dst: object) -> None:
        raise KeyboardInterrupt  # the process dies between writing the temp file and naming it

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        Signer.load_or_create(keys)
    monkeypatch.undo()
    assert not (keys / PRIVATE_FILE).exists()  # no 0-byte key that blocks every later start
    signer = Signer.load_or_create(keys)  # the next start simply makes it
    assert Signer.load_or_create(keys).key_id == signer.key_id
    assert stat.S_IMODE((keys / PRIVATE_FILE).stat().st_mode) == 0o600
    assert not list(keys.glob(".*.tmp"))


def test_a_stale_temp_key_from_a_kill_is_removed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    signer = Signer.load_or_create(keys)
    stale = keys / f".{PRIVATE_FILE}.abc123.tmp"
    stale.write_bytes(b"half a key")
    assert Signer.load_or_create(keys).key_id == signer.key_id
    assert not stale.exists()


def test_the_signing_key_is_never_replaced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    Signer.load_or_create(keys)
    with pytest.raises(FileExistsError):
        create_private_file(keys / PRIVATE_FILE, b"another key")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (b"", "is empty"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "backup"),
        (b"\x00" * 100, "not a readable unencrypted PEM private key"),
    ],
    ids=["empty", "bad-pem", "binary"],
)
def test_an_unusable_signing_key_is_a_clear_error(
    tmp_path: Path, damage: bytes, message: str
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / PRIVATE_FILE).write_bytes(damage)
    (keys / PRIVATE_FILE).chmod(0o600)
    with pytest.raises(SigningKeyError, match=message):
        Signer.load_or_create(keys)
    assert (keys / PRIVATE_FILE).read_bytes() == damage
    assert not (keys / PUBLIC_FILE).exists()


def test_a_public_key_that_is_not_the_private_keys_half_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    Signer.load_or_create(a)
    Signer.load_or_create(b)
    (a / PUBLIC_FILE).write_bytes((b / PUBLIC_FILE).read_bytes())
    with pytest.raises(SigningKeyError, match="not the public half"):
        Signer.load_or_create(a)


# The PKI that `sluice init` writes.


def test_an_empty_ca_key_is_a_clear_error(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki")
    layout.ca_key.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        CertificateAuthority.load(layout)
    with pytest.raises(ValueError, match="is empty"):
        init_pki(tmp_path / "pki", readers=["global-team"])  # never a new CA over it
    assert layout.ca_key.read_bytes() == b""


def test_init_drops_stale_temp_files_and_reissues_a_broken_listener_pair(
    tmp_path: Path,
) -> None:
    layout = init_pki(tmp_path / "pki")
    stale = layout.directory / ".internal.key.0123.tmp"
    stale.write_bytes(b"a private key, half written")
    # A crash between writing a listener's new key and its new certificate.
    other = init_pki(tmp_path / "other")
    layout.server_key("internal").write_bytes(other.server_key("internal").read_bytes())
    assert not key_matches_cert(layout.server_cert("internal"), layout.server_key("internal"))
    ca_before = layout.ca_key.read_bytes()
    init_pki(layout.directory)
    assert not stale.exists()
    assert key_matches_cert(layout.server_cert("internal"), layout.server_key("internal"))
    assert layout.ca_key.read_bytes() == ca_before


def test_init_records_every_issued_client_certificate(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", trainers=[("shanghai-01", "shanghai")])
    init_pki(layout.directory, readers=["global-team"])
    serial = cert_serial(layout.client_cert("shanghai-01"))
    # Removing a certificate to reissue it does not forget whose the old serial was.
    layout.client_cert("shanghai-01").unlink()
    layout.client_key("shanghai-01").unlink()
    init_pki(layout.directory, trainers=[("shanghai-01", "shanghai")])
    issued = issued_principals(layout)
    assert issued[serial].name == "shanghai-01"
    assert issued[cert_serial(layout.client_cert("shanghai-01"))].name == "shanghai-01"
    assert issued[cert_serial(layout.client_cert("global-team"))].role == "reader"
    assert len(issued) == 3


def test_issued_principals_of_a_pki_without_a_log(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", operators=["ops"])
    layout.issued_log.unlink()  # made before the log existed
    assert [p.name for p in issued_principals(layout).values()] == ["ops"]
    assert issued_principals(PkiLayout(tmp_path / "none")) == {}


def test_client_usage_is_checked(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", operators=["ops"])
    assert pki.principal_from_pem(layout.client_cert("ops").read_bytes()).role == "operator"
    with pytest.raises(pki.UnknownPrincipal, match="no extendedKeyUsage"):
        pki.principal_from_pem(layout.ca_cert.read_bytes())  # our own CA, presented as a client
