"""Signing keys protected at rest in the shared store: AES-256-GCM under a key-encryption key (KEK) only the
replicas hold.

Why: whoever reads the database (a backup, a replica's dump, a DBA's session) must not be able to mint
credentials. Each private key is sealed before it reaches PostgreSQL, with the key id (its public thumbprint)
as associated data, so a sealed key moved to another row does not open; a wrong KEK or a changed byte fails
the GCM tag and the control plane refuses to start (or to adopt the set), never signing with something else.
After opening, the key's own thumbprint must equal its kid: the public half is checked too.

The KEK comes from an environment variable or a file, never argv (a command line is readable by every user):
base64 of 32 random bytes (`openssl rand -base64 32`). The value may hold a second KEK after the first
(whitespace-separated): the *previous* one, used only to open keys sealed before a KEK rotation; sealing always
uses the first. Sealed form: b"cpk1" + KEK id (8 bytes of SHA-256 of the KEK, to name which KEK sealed it) +
12-byte random nonce + ciphertext and tag. No message or repr ever holds a KEK or key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controlplane.secretfile import SecretFileError, read_secret_file

KEK_BYTES = 32
MAX_KEK_FILE_BYTES = 1024
_MAGIC = b"cpk1"
_KEK_ID_BYTES = 8
_NONCE_BYTES = 12
_HOW = "base64 of 32 random bytes (openssl rand -base64 32), optionally followed by the previous KEK"


class KekError(ValueError):
    """The KEK or its source is unusable; the message names the flag, variable or file, never the value."""


class SealError(Exception):
    """A sealed private key does not open: a wrong KEK, or a tampered or damaged row. Never holds key material."""


class KeyCipher:
    """Seals with the first KEK, opens with any. `repr` shows KEK ids only."""

    def __init__(self, keks: list[bytes], source: str) -> None:
        if not keks or any(len(k) != KEK_BYTES for k in keks):
            raise KekError(f"{source}: a KEK is {KEK_BYTES} bytes")
        self.source = source
        self._aeads = [(_kek_id(kek), AESGCM(kek)) for kek in keks]

    def __repr__(self) -> str:
        return f"KeyCipher(source={self.source!r}, keks={[kid.hex() for kid, _ in self._aeads]})"

    @property
    def primary_id(self) -> bytes:
        return self._aeads[0][0]

    def seal(self, kid: str, private_pem: str) -> bytes:
        kek_id, aead = self._aeads[0]
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + kek_id + nonce + aead.encrypt(nonce, private_pem.encode("ascii"), kid.encode())

    def sealed_with(self, sealed: bytes) -> bytes:
        """The id of the KEK that sealed `sealed` (a key sealed with a previous KEK is re-sealed by the writer)."""
        return sealed[len(_MAGIC) : len(_MAGIC) + _KEK_ID_BYTES]

    def open(self, kid: str, sealed: bytes) -> str:
        header = len(_MAGIC) + _KEK_ID_BYTES
        if len(sealed) <= header + _NONCE_BYTES or not sealed.startswith(_MAGIC):
            raise SealError(f"key {kid}: not a sealed private key (damaged row)")
        kek_id = self.sealed_with(sealed)
        aead = next((a for i, a in self._aeads if i == kek_id), None)
        if aead is None:
            raise SealError(
                f"key {kid}: sealed with KEK {kek_id.hex()}, which {self.source} does not hold "
                f"(it holds {', '.join(i.hex() for i, _ in self._aeads)}): give that KEK, first or as the previous one"
            )
        nonce, body = sealed[header : header + _NONCE_BYTES], sealed[header + _NONCE_BYTES :]
        try:
            plain = aead.decrypt(nonce, body, kid.encode())
        except InvalidTag:
            raise SealError(
                f"key {kid}: the sealed private key does not open with KEK {kek_id.hex()}: "
                "the row was changed or moved, or the KEK is not the one that sealed it"
            ) from None
        try:
            return plain.decode("ascii")
        except UnicodeDecodeError:
            raise SealError(f"key {kid}: the opened private key is not PEM") from None


def _kek_id(kek: bytes) -> bytes:
    """Names a KEK without revealing it (a hash under its own label, not usable to test guesses cheaply
    against anything but 256 random bits)."""
    return hashlib.sha256(b"controlplane signing-key KEK id\0" + kek).digest()[:_KEK_ID_BYTES]


def parse_keks(text: str, source: str) -> KeyCipher:
    """One KEK, or the current one then the previous one, as base64 separated by whitespace."""
    words = text.split()
    if not 1 <= len(words) <= 2:
        raise KekError(f"{source}: expected one or two KEKs, found {len(words)}; each is {_HOW}")
    keks = []
    for position, word in enumerate(words):
        try:
            kek = base64.b64decode(word, validate=True)
        except (binascii.Error, ValueError):
            kek = b""
        if len(kek) != KEK_BYTES:
            which = "first" if position == 0 else "second (previous)"
            raise KekError(f"{source}: the {which} KEK is not {_HOW}")
        keks.append(kek)
    if len(keks) == 2 and keks[0] == keks[1]:
        raise KekError(f"{source}: the previous KEK is the current one")
    return KeyCipher(keks, source)


def from_env(name: str, environ: Mapping[str, str] | None = None) -> KeyCipher:
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        raise KekError(f"--store-key-env: environment variable {name} is not set")
    return parse_keks(value, f"environment variable {name}")


def from_file(path: Path) -> KeyCipher:
    """Read strictly, as the DSN file (store/dsn.py): a regular file, not followed through a symbolic link."""
    where = f"--store-key-file {path}"
    try:
        data = read_secret_file(path, flag="--store-key-file", max_bytes=MAX_KEK_FILE_BYTES, holds="one or two KEKs")
    except SecretFileError as error:
        raise KekError(str(error)) from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KekError(f"{where}: not ASCII text") from None
    return parse_keks(text, where)


def resolve(*, key_env: str | None, key_file: Path | None) -> KeyCipher:
    """The one KEK source the options name (exactly one)."""
    if (key_env is None) == (key_file is None):
        raise KekError(
            "--store postgres with credentials needs a key-encryption key for the signing keys exactly once "
            f"(--store-key-env NAME or --store-key-file PATH), got {'both' if key_env else 'none'}; it is {_HOW}"
        )
    if key_env is not None:
        return from_env(key_env)
    assert key_file is not None
    return from_file(key_file)
