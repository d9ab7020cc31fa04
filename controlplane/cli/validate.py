"""`controlplane validate`: the version each gateway would get, computed as `serve` computes it.

A gateway's version is a hash of everything its Envoys are sent, and `serve` compiles more than the policy
files: the keys of relayed issuers (fetched from their JWKS URIs), the control plane's own credentials (its
signing keys and revoked jobs, from its state dir, and the token-exchange route), the secrets injected for
backends, and the project ids it remembers. Compiling the files alone gave versions `serve` never served.

So validate reads the same inputs `serve` would read now, with serve's flags and defaults: run on the same
machine with the same `--state-dir` and exchange flags, it prints the versions `serve` serves for that policy.
What it cannot reproduce is named in a `note:` line instead of being silently left out: an issuer whose keys
could not be fetched, a state dir with no signing keys yet (serve makes new ones on its first start), GitLab's
live data for issuers with `api:`, and every later change (a key rotation, a revoked job, a rewritten secret).
`--offline` compiles the policy alone: no fetch, no state dir, no credentials, no secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.cli.defaults import option_default
from controlplane.credentials.keys import KEYS_FILE, FileKeyStore, KeyStore, SigningKeys, StoredKey
from controlplane.credentials.revocations import REVOCATIONS_FILE, Revocations
from controlplane.credentials.service import DEFAULT_EXCHANGE_ADDRESS, CredentialOptions
from controlplane.model.credentials import CredentialInputs
from controlplane.model.policy import JwksMode, Policy
from controlplane.sources.jwks import JwksFetcher
from controlplane.sources.pins import PINS_FILE, PinStore
from controlplane.sources.secrets import read_secrets
from controlplane.statefile import default_state_dir

JWKS_TIMEOUT = 5.0


@dataclass
class ServedInputs:
    """What serve adds to the policy when it compiles, as far as validate could read it."""

    keys: dict[str, str] = field(default_factory=dict)
    pins: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    credentials: CredentialInputs | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why serve's versions may still differ


def add_served_input_arguments(parser: argparse.ArgumentParser, host_port: Callable[[str], tuple[str, int]]) -> None:
    """The serve flags that change what is compiled, with serve's defaults."""
    group = parser.add_argument_group("what serve would compile in (same flags and defaults as serve)")
    group.add_argument("--state-dir", type=Path, default=default_state_dir(), help="serve's --state-dir")
    group.add_argument("--exchange-address", type=host_port, default=DEFAULT_EXCHANGE_ADDRESS)
    group.add_argument("--exchange-public-address", type=host_port)
    group.add_argument("--no-exchange", action="store_true", help="serve runs with --no-exchange")
    group.add_argument("--key-rotation", type=float, default=option_default(CredentialOptions, "rotate_every"))
    group.add_argument("--key-publish-lead", type=float)  # unset: serve's default for a file store, 1 s
    group.add_argument(
        "--max-credential-ttl", type=float, default=option_default(CredentialOptions, "max_credential_ttl")
    )
    group.add_argument(
        "--offline", action="store_true", help="the policy alone: fetch no keys, read no state dir or secrets"
    )


def served_inputs(policy: Policy, args: argparse.Namespace) -> ServedInputs:
    """Read as serve would read them now. What could not be read is a note; logs of the readers, which
    speak as if serving ("signing key created"), are kept quiet."""
    for name in ("controlplane.jwks", "controlplane.credentials.keys"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.offline:
        return ServedInputs(notes=["--offline: the policy alone; serve also compiles in keys, credentials, secrets"])
    inputs = ServedInputs(pins=_pins(args.state_dir), secrets=read_secrets(policy))
    inputs.keys = asyncio.run(_fetch_keys(policy, inputs.notes))
    if not args.no_exchange:
        inputs.credentials = _credentials(args, inputs.notes)
    live = [i.name for i in policy.issuers if i.api is not None]
    if live:
        inputs.notes.append(f"issuer(s) {', '.join(live)} are read from GitLab live by serve: not included here")
    missing = sorted(b.name for b in policy.backends if b.inject is not None and b.name not in inputs.secrets)
    if missing:
        inputs.notes.append(f"no secret readable here for backend(s) {', '.join(missing)} (delivered empty)")
    return inputs


def _pins(state_dir: Path) -> Mapping[str, Mapping[str, int]]:
    return PinStore(state_dir / PINS_FILE).load()


async def _fetch_keys(policy: Policy, notes: list[str]) -> dict[str, str]:
    """One fetch per relayed issuer, as serve's key relay makes at start."""
    relayed = [i for i in policy.issuers if i.jwks_mode is JwksMode.RELAY]
    fetchers = [
        JwksFetcher(i.url, jwks_uri=i.jwks_uri, timeout=JWKS_TIMEOUT, max_retries=1, name=i.name) for i in relayed
    ]
    try:
        await asyncio.gather(*(f.refresh() for f in fetchers))
    finally:
        for fetcher in fetchers:
            await fetcher.close()
    keys = {}
    for fetcher in fetchers:
        if fetcher.document is None:
            notes.append(f"keys of issuer {fetcher.name} not fetched ({fetcher.last_error}): serve's will differ")
        else:
            keys[fetcher.name] = fetcher.document.canonical
    return keys


def _credentials(args: argparse.Namespace, notes: list[str]) -> CredentialInputs:
    """What serve's credential service hands the compiler now, read without writing its state dir."""
    options = CredentialOptions(
        listen=args.exchange_address,
        public=args.exchange_public_address or args.exchange_address,
        state_dir=args.state_dir,
        rotate_every=args.key_rotation,
        publish_lead=CredentialOptions.publish_lead if args.key_publish_lead is None else args.key_publish_lead,
        max_credential_ttl=args.max_credential_ttl,
    )
    store = _ReadOnly(FileKeyStore(options.state_dir / KEYS_FILE))
    keys = SigningKeys(
        store,
        rotate_every=options.rotate_every,
        max_credential_ttl=options.max_credential_ttl,
        publish_lead=options.publish_lead,
    )
    if store.empty:
        notes.append(f"no signing keys in {options.state_dir} yet: serve creates its own at its first start")
    revocations = Revocations(options.state_dir / REVOCATIONS_FILE)
    return CredentialInputs(
        jwks=keys.published_jwks(), exchange_address=options.public, revoked_jobs=revocations.active()
    )


class _ReadOnly:
    """A key store that is read, never written: validate must not rotate a running serve's keys."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self.empty = False

    def load(self) -> list[StoredKey]:
        keys = self._store.load()
        self.empty = not keys
        return keys

    def save(self, keys: Sequence[StoredKey]) -> None:
        pass
