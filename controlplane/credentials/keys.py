"""The control plane's signing keys: created on first start, persisted, rotated without rejecting anything.

Rotation timeline for a key K followed by K' (all times from the injected clock, in seconds):

    K.not_before ──── K signs ──── K'.not_before ──── K' signs ────▶
                 K'.created = K'.not_before - publish_lead   (K' is published, not yet signing)
                                  K.retire_after = K'.not_before + max_credential_ttl  (K dropped)

- A new key is *published* `publish_lead` seconds before it may sign, so every Envoy holds it before the first
  credential it signs reaches one (publishing is a JWKS change the caller pushes over xDS).
- A key stops signing when its successor's `not_before` passes; the last credential it signed expires at most
  `max_credential_ttl` later, so it stays published exactly until then. No valid credential is ever rejected
  because of rotation, and no key lingers longer than needed.
- After a long downtime the successor still gets its full `publish_lead`: the old key keeps signing meanwhile.

The first key on an empty store signs at once: there is no earlier key to fall back on, and the caller only
opens the exchange once the first JWKS is in its snapshot.

`SigningKeys` is pure logic over a clock; persistence goes through a `KeyStore` (a file by default, an
interface a Kubernetes Secret store can implement). Private keys never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.credentials import metrics
from controlplane.sources.jwks import normalize_jwks
from controlplane.statefile import StateFileError, atomic_write_json, read_json, report_write_failure

log = logging.getLogger("controlplane.credentials.keys")

KEYS_FILE = "signing-keys.json"  # its name in the state directory

ALGORITHM = "ES256"
_COORDINATE_BYTES = 32  # P-256


class KeyStoreError(StateFileError):
    """The store cannot be read or written; the message never holds key material."""


@dataclass(frozen=True)
class StoredKey:
    """One signing key as persisted. `retire_after` is None while no successor is scheduled."""

    kid: str
    private_pem: str = field(repr=False)
    created_at: float
    not_before: float  # when it may start signing
    retire_after: float | None = None  # when it may be dropped from the published JWKS

    def to_json(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "private_pem": self.private_pem,
            "created_at": self.created_at,
            "not_before": self.not_before,
            "retire_after": self.retire_after,
        }

    @classmethod
    def from_json(cls, data: Any) -> StoredKey:
        if not isinstance(data, dict):
            raise KeyStoreError("malformed: a key entry is not an object")
        try:
            retire = data.get("retire_after")
            return cls(
                kid=str(data["kid"]),
                private_pem=str(data["private_pem"]),
                created_at=float(data["created_at"]),
                not_before=float(data["not_before"]),
                retire_after=None if retire is None else float(retire),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise KeyStoreError(
                f"malformed: a key entry lacks a field or has a wrong type ({type(error).__name__})"
            ) from None


class KeyStore(Protocol):
    """Where signing keys live between runs. `save` replaces the whole set atomically."""

    def load(self) -> list[StoredKey]: ...

    def save(self, keys: Sequence[StoredKey]) -> None: ...


class FileKeyStore:
    """A JSON file, mode 0600, replaced atomically and durably through `controlplane.statefile` (a crash leaves
    the old or the new set, never half)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> list[StoredKey]:
        """The stored keys; [] when the file does not exist yet. A corrupt file is an error naming it, never
        ignored: starting over would silently invalidate every credential in flight. Every private key is
        parsed here, so a damaged one stops the start rather than the first exchange."""
        try:
            document = read_json(self.path)
        except KeyStoreError:
            raise
        except StateFileError as error:
            raise KeyStoreError(str(error)) from None
        if document is None:
            return []
        if not isinstance(document.get("keys"), list):
            raise KeyStoreError(f'{self.path}: malformed: expected an object with a "keys" list')
        try:
            keys = [StoredKey.from_json(entry) for entry in document["keys"]]
            for key in keys:
                _load_private_key(key)
        except KeyStoreError as error:
            raise KeyStoreError(f"{self.path}: {error}") from None
        return keys

    def save(self, keys: Sequence[StoredKey]) -> None:
        try:
            atomic_write_json(self.path, {"version": 1, "keys": [k.to_json() for k in keys]})
        except KeyStoreError:
            raise
        except StateFileError as error:
            raise KeyStoreError(str(error)) from None


class ActiveKey(NamedTuple):
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    not_before: float


class SigningKeys:
    """Which key signs now, which keys Envoy must accept, and when that changes.

    Loads the store (creating the first key on an empty one) when constructed. Call `rotate_if_due` at
    `next_change_at()` (or any time: it is idempotent); it returns True when the published JWKS changed.

    With a shared store (`store=None`, keys_pg.py) the keys are read by the caller and handed in (`adopted`,
    then `adopt()` after every re-read); the caller asks `planned()` what the set should become and writes it
    itself, so everything read on the hot path (`signing_key()`, `published_jwks()`) stays synchronous.
    """

    def __init__(
        self,
        store: KeyStore | None,
        *,
        rotate_every: float,
        max_credential_ttl: float,
        publish_lead: float,
        clock: Callable[[], float] = time.time,
        adopted: Sequence[StoredKey] = (),
    ) -> None:
        if rotate_every <= publish_lead:
            raise ValueError("rotate_every must be longer than publish_lead")
        if min(rotate_every, max_credential_ttl, publish_lead) <= 0:
            raise ValueError("rotate_every, max_credential_ttl and publish_lead must be positive")
        self.rotate_every = rotate_every
        self.max_credential_ttl = max_credential_ttl
        self.publish_lead = publish_lead
        self._store = store
        self._clock = clock
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._unsaved = False
        if store is None:  # a shared store's keys, read by its caller (keys_pg.py): changed only through adopt()
            if not adopted:
                raise ValueError("signing keys without a store need the keys read from the shared store")
            self._keys: list[StoredKey] = []
            self.adopt(adopted)
        else:
            self._keys = sorted(store.load(), key=lambda k: k.not_before)
            self.rotate_if_due()
        metrics.track_signing_keys(self.signing_key_age, lambda: len(self._keys))

    # -- what callers read

    @property
    def keys(self) -> tuple[StoredKey, ...]:
        """Every published key, oldest first."""
        return tuple(self._keys)

    def signing_key(self) -> ActiveKey:
        """The newest key whose `not_before` has passed."""
        now = self._clock()
        usable = [k for k in self._keys if k.not_before <= now]
        if not usable:  # only if the store was edited by hand: never sign with a key not yet published
            raise RuntimeError("no signing key may sign yet")
        key = usable[-1]
        return ActiveKey(key.kid, self._private_key(key), key.not_before)

    def signing_key_age(self) -> float:
        """Seconds since the signing key started signing (read at every metrics scrape)."""
        now = self._clock()
        started = [k.not_before for k in self._keys if k.not_before <= now]
        return now - started[-1] if started else 0.0

    def published_jwks(self) -> str:
        """Canonical JWKS JSON of every published key (public members only, sorted by kid)."""
        jwks = {"keys": [public_jwk(self._private_key(k).public_key(), k.kid) for k in self._keys]}
        document, _ = normalize_jwks(json.dumps(jwks))
        return document.canonical

    def next_change_at(self) -> float:
        """When `rotate_if_due` next has something to do, or the signing key switches."""
        newest = self._keys[-1]
        events = [k.retire_after for k in self._keys if k.retire_after is not None]
        if newest.not_before > self._clock():
            events.append(newest.not_before)
        else:
            events.append(newest.not_before + self.rotate_every - self.publish_lead)
        return min(events)

    # -- changing

    def rotate_if_due(self) -> bool:
        """Drop keys past `retire_after`, schedule the next key when due; persist and return True on change."""
        if self._store is None:
            raise RuntimeError("keys of a shared store are rotated by its caller (planned, then adopt)")
        kept = self.planned(self._keys)
        if kept is not None or self._unsaved:
            self._save(kept if kept is not None else self._keys)
        if kept is None:
            return False
        self._forget_private_keys(kept)
        self._keys = kept
        log.info("signing keys now published: %s", ", ".join(k.kid for k in kept))
        return True

    def planned(self, stored: Sequence[StoredKey]) -> list[StoredKey] | None:
        """What `stored` should become now (keys past `retire_after` dropped, the first key or the next one
        added), or None when nothing is due. Generates a key when one is due, changes nothing else."""
        now = self._clock()
        ordered = sorted(stored, key=lambda k: k.not_before)
        kept = [k for k in ordered if k.retire_after is None or k.retire_after > now]
        changed = len(kept) != len(ordered)
        if not kept:
            return [self._new_key(now, not_before=now)]
        if self._successor_due(kept[-1], now):
            return self._with_successor(kept, now)
        return kept if changed else None

    def adopt(self, stored: Sequence[StoredKey]) -> bool:
        """Take the key set read from a shared store; True when the published set changed. Every private key is
        parsed first (a bad one raises KeyStoreError and nothing changes)."""
        keys = sorted(stored, key=lambda k: k.not_before)
        if not keys:
            raise KeyStoreError("the shared store holds no signing key")
        for key in keys:
            self._private_key(key)
        changed = [(k.kid, k.not_before, k.retire_after) for k in keys] != [
            (k.kid, k.not_before, k.retire_after) for k in self._keys
        ]
        self._forget_private_keys(keys)
        self._keys = keys
        if changed:
            log.info("signing keys now published: %s", ", ".join(k.kid for k in keys))
        return changed

    def _save(self, keys: list[StoredKey]) -> None:
        """A key set the disk refused is still used (reported, retried at the next call): refusing to rotate
        would keep an old key signing, and a restart then falls back to the last set written."""
        assert self._store is not None  # rotate_if_due refuses without one
        try:
            self._store.save(keys)
        except StateFileError as error:
            self._unsaved = True
            path = getattr(self._store, "path", None)
            report_write_failure(
                path if isinstance(path, Path) else Path("signing-keys"),
                error,
                "the new signing keys are used from memory, not yet on disk",
            )
        else:
            self._unsaved = False

    def _successor_due(self, newest: StoredKey, now: float) -> bool:
        return newest.not_before <= now and now >= newest.not_before + self.rotate_every - self.publish_lead

    def _with_successor(self, keys: list[StoredKey], now: float) -> list[StoredKey]:
        """K' signs after K's full period, but never before every Envoy had `publish_lead` to receive it."""
        current = keys[-1]
        not_before = max(current.not_before + self.rotate_every, now + self.publish_lead)
        retired = replace(current, retire_after=not_before + self.max_credential_ttl)
        return [*keys[:-1], retired, self._new_key(now, not_before=not_before)]

    def _new_key(self, now: float, *, not_before: float) -> StoredKey:
        key, private = _generate(now, not_before=not_before)
        self._private[key.kid] = private
        return key

    def _private_key(self, key: StoredKey) -> ec.EllipticCurvePrivateKey:
        cached = self._private.get(key.kid)
        if cached is None:
            cached = self._private[key.kid] = _load_private_key(key)
        return cached

    def _forget_private_keys(self, keys: Sequence[StoredKey]) -> None:
        live = {k.kid for k in keys}
        for kid in self._private.keys() - live:
            del self._private[kid]


def first_key(now: float) -> StoredKey:
    """A new key that signs at once: the first of an empty store."""
    return _generate(now, not_before=now)[0]


def _generate(now: float, *, not_before: float) -> tuple[StoredKey, ec.EllipticCurvePrivateKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    kid = thumbprint(public_jwk(private.public_key()))
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    log.info("signing key %s created; signs from %.0f", kid, not_before)
    return StoredKey(kid=kid, private_pem=pem, created_at=now, not_before=not_before), private


def load_private_key(key: StoredKey) -> ec.EllipticCurvePrivateKey:
    """The key's private half, checked: a P-256 key whose public thumbprint is its kid (a row whose private key
    was swapped for another is refused, not published under a kid that is not its own)."""
    loaded = _load_private_key(key)
    if thumbprint(public_jwk(loaded.public_key())) != key.kid:
        raise KeyStoreError(f"key {key.kid}: the private key does not belong to this kid")
    return loaded


def _load_private_key(key: StoredKey) -> ec.EllipticCurvePrivateKey:
    try:
        loaded = serialization.load_pem_private_key(key.private_pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise KeyStoreError(f"key {key.kid}: the private key cannot be parsed") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise KeyStoreError(f"key {key.kid}: the private key is not a P-256 key")
    return loaded


def public_jwk(public: ec.EllipticCurvePublicKey, kid: str | None = None) -> dict[str, str]:
    """The public JWK of a P-256 key; with `kid`, ready to publish."""
    numbers = public.public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x), "y": _b64(numbers.y)}
    if kid is not None:
        jwk.update(kid=kid, alg=ALGORITHM, use="sig")
    return jwk


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members in lexicographic order, without whitespace."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(_COORDINATE_BYTES, "big")).rstrip(b"=").decode()
