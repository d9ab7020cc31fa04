"""`controlplane validate`: the version each gateway would get, computed as `serve` computes it.

A gateway's version is a hash of everything its Envoys are sent, and `serve` compiles more than the policy
files: the keys of relayed issuers (fetched from their JWKS URIs), the control plane's own credentials (its
signing keys and revoked jobs, from its state dir, and the token-exchange route), the secrets injected for
backends, and the project ids it remembers. Compiling the files alone gave versions `serve` never served.

So validate reads the same inputs `serve` would read now, with serve's flags and defaults: run on the same
machine with the same `--state-dir` and exchange flags, it prints the versions `serve` serves for that policy.
What it cannot reproduce is named in a `note:` line instead of being silently left out: an issuer whose keys
could not be fetched, a state dir with no signing keys yet (serve makes new ones on its first start), GitLab's
live data for issuers with `api:`, the deny list's split between the recent list and the buckets (run-time state:
validate places every listed job as a starting serve does), and every later change (a key rotation, a revoked
job, a rewritten secret).
`--offline` compiles the policy alone: no fetch, no state dir, no credentials, no secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.certfiles import check_served_to_gateways, load_certificate_set, pem_text
from controlplane.cli.defaults import option_default
from controlplane.cli.environment import EXCHANGE_ADDRESS_ENV, EXCHANGE_PUBLIC_ADDRESS_ENV, address_default
from controlplane.cli.options import STORE_KINDS, StoreOptions
from controlplane.credentials.keys import KEYS_FILE, FileKeyStore, KeyStoreError, SigningKeys, StoredKey
from controlplane.credentials.keys_pg import PostgresKeyStore
from controlplane.credentials.revocation_store import RevocationStoreError
from controlplane.credentials.revocation_store_pg import PostgresRevocationStore
from controlplane.credentials.revocations import REVOCATIONS_FILE, Revocations
from controlplane.credentials.service import DEFAULT_EXCHANGE_ADDRESS, CredentialOptions, shared_publish_lead
from controlplane.model.credentials import CredentialInputs, ExchangeTls, revocation_buckets
from controlplane.model.policy import JwksMode, Policy
from controlplane.sources.jwks import JwksFetcher
from controlplane.sources.pins import PINS_FILE, PinStore
from controlplane.sources.pins_pg import PostgresPinStore
from controlplane.sources.secrets import read_secrets
from controlplane.statefile import default_state_dir
from controlplane.store.migrations import schema_version
from controlplane.store.pool import PoolSettings, StorePool, StoreUnavailable

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
    group.add_argument(
        "--exchange-address", type=host_port, default=address_default(EXCHANGE_ADDRESS_ENV, DEFAULT_EXCHANGE_ADDRESS)
    )
    group.add_argument(
        "--exchange-public-address", type=host_port, default=address_default(EXCHANGE_PUBLIC_ADDRESS_ENV, None)
    )
    group.add_argument("--no-exchange", action="store_true", help="serve runs with --no-exchange")
    # With TLS on the exchange hop, serve compiles the cluster's name check and pushes the CA bundle: both are
    # in the versions. The certificate and key are checked as serve checks them at start.
    group.add_argument("--exchange-tls-cert", type=Path, help="serve's --exchange-tls-cert")
    group.add_argument("--exchange-tls-key", type=Path, help="serve's --exchange-tls-key")
    group.add_argument("--exchange-tls-ca", type=Path, help="serve's --exchange-tls-ca")
    group.add_argument("--exchange-tls-name", help="serve's --exchange-tls-name")
    group.add_argument("--key-rotation", type=float, default=option_default(CredentialOptions, "rotate_every"))
    group.add_argument("--key-publish-lead", type=float)  # unset: serve's default for a file store, 1 s
    group.add_argument(
        "--max-credential-ttl", type=float, default=option_default(CredentialOptions, "max_credential_ttl")
    )
    group.add_argument(
        "--offline", action="store_true", help="the policy alone: fetch no keys, read no state dir or secrets"
    )
    shared = parser.add_argument_group("serve's shared store (serve --store postgres): read, never written")
    shared.add_argument("--store", choices=STORE_KINDS, default=option_default(StoreOptions, "kind"))
    shared.add_argument("--store-dsn-env", help="environment variable holding the DSN")
    shared.add_argument("--store-dsn-file", type=Path, help="file holding the DSN (one line)")
    shared.add_argument("--store-dsn", help="the DSN itself, refused with a password")
    shared.add_argument("--store-key-env", help="environment variable holding the signing keys' KEK")
    shared.add_argument("--store-key-file", type=Path, help="file holding the signing keys' KEK")


# The deny list's split is run-time state: which listed jobs a running serve still holds in its recent list
# (those revoked since its last seal) is known to it alone. A serve that starts now seals all of them.
RECENT_NOTE = (
    "revoked jobs are placed as a serve starting now places them (all sealed in their buckets): a running serve "
    "holds those revoked in its last 5 minutes in its recent list, and serves these versions after its next seal"
)


EXCHANGE_TLS_TOGETHER = (
    "--exchange-tls-cert, --exchange-tls-key and --exchange-tls-ca go together (--exchange-tls-name needs them)"
)


def exchange_tls_flags(args: argparse.Namespace) -> tuple[Path, Path, Path, str] | None:
    """The `--exchange-tls-*` flags serve and validate share, as (cert, key, CA, the name gateways check: by
    default the public address's host), or None without them; `ValueError` for flags that do not go together."""
    files = (args.exchange_tls_cert, args.exchange_tls_key, args.exchange_tls_ca)
    if any(files) != all(files) or (args.exchange_tls_name and not any(files)):
        raise ValueError(EXCHANGE_TLS_TOGETHER)
    if not all(files):
        return None
    name = args.exchange_tls_name or (args.exchange_public_address or args.exchange_address)[0]
    return (*files, name)


def exchange_tls(args: argparse.Namespace) -> ExchangeTls | None:
    """What serve's `--exchange-tls-*` flags compile in, read and checked as serve does at start: `ValueError`
    for flags that do not go together, `CertificateFileError` for a file serve would refuse to start with."""
    flags = exchange_tls_flags(args)
    if flags is None or args.no_exchange or args.offline:
        return None
    cert, key, ca, name = flags
    loaded = load_certificate_set(cert, key, ca)
    check_served_to_gateways(loaded, name, cert, ca)
    assert loaded.ca is not None
    return ExchangeTls(server_name=name, ca_pem=pem_text(loaded.ca))


def served_inputs(policy: Policy, args: argparse.Namespace) -> ServedInputs:
    """Read as serve would read them now. What could not be read is a note; logs of the readers, which
    speak as if serving ("signing key created"), are kept quiet."""
    for name in ("controlplane.jwks", "controlplane.credentials.keys"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.offline:
        return ServedInputs(notes=["--offline: the policy alone; serve also compiles in keys, credentials, secrets"])
    inputs = ServedInputs(secrets=read_secrets(policy))
    inputs.keys = asyncio.run(_fetch_keys(policy, inputs.notes))
    if args.store == "postgres":
        state = asyncio.run(_read_shared_store(args, inputs.notes))
    else:
        state = _read_state_dir(args, inputs.notes)
    inputs.pins = state.pins
    if not args.no_exchange:
        inputs.credentials = _credentials(args, state)
        if inputs.credentials.revoked_jobs:
            inputs.notes.append(RECENT_NOTE)
    live = [i.name for i in policy.issuers if i.api is not None]
    if live:
        inputs.notes.append(f"issuer(s) {', '.join(live)} are read from GitLab live by serve: not included here")
    missing = sorted(
        b.name for b in policy.backends if b.inject is not None and b.gcp is None and b.name not in inputs.secrets
    )
    gcp = sorted(b.name for b in policy.backends if b.gcp is not None)
    if gcp:  # obtained by serve from Google at run time: never here, so never in compiled output
        inputs.notes.append(f"the Google Cloud token of backend(s) {', '.join(gcp)} is obtained by serve only")
    if missing:
        inputs.notes.append(f"no secret readable here for backend(s) {', '.join(missing)} (delivered empty)")
    return inputs


@dataclass
class _ServeState:
    """What `serve` keeps between starts and compiles in: signing keys, the deny list, remembered ids."""

    keys: list[StoredKey] = field(default_factory=list)
    revoked: Mapping[str, float] = field(default_factory=dict)  # job id -> denied until
    pins: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def _read_state_dir(args: argparse.Namespace, notes: list[str]) -> _ServeState:
    keys = FileKeyStore(args.state_dir / KEYS_FILE).load()
    if not keys and not args.no_exchange:
        notes.append(f"no signing keys in {args.state_dir} yet: serve creates its own at its first start")
    revoked = Revocations(args.state_dir / REVOCATIONS_FILE)
    until = {job: float("inf") for job in revoked.active()}
    return _ServeState(keys, until, PinStore(args.state_dir / PINS_FILE).load())


async def _read_shared_store(args: argparse.Namespace, notes: list[str]) -> _ServeState:
    """The same from PostgreSQL, with a connection of its own and no migration: validate never changes the schema
    or a row. Unreachable or not yet created: a note, and serve's versions will differ."""
    options = StoreOptions(
        "postgres", args.store_dsn, args.store_dsn_env, args.store_dsn_file, args.store_key_env, args.store_key_file
    )
    dsn = options.resolve_dsn()
    assert dsn is not None
    pool = StorePool(dsn, PoolSettings(min_size=1, max_size=2))
    try:
        await pool.open()
        async with pool.connection() as conn:
            version = await schema_version(conn)
        if version == 0:
            notes.append(f"no schema in {dsn.redacted()} yet: serve creates it, and its keys, at its first start")
            return _ServeState()
        keys = [] if args.no_exchange else await PostgresKeyStore(pool, options.key_cipher()).load()
        if not keys and not args.no_exchange:
            notes.append(f"no signing keys in {dsn.redacted()} yet: serve creates them at its first start")
        revoked, _ = await PostgresRevocationStore(pool).changes(0)
        pins = PostgresPinStore(pool)
        await pins.open()
        return _ServeState(keys, revoked, pins.current)
    except (StoreUnavailable, KeyStoreError, RevocationStoreError) as error:
        notes.append(f"serve's shared store could not be read ({error}): serve's versions will differ")
        return _ServeState()
    finally:
        await pool.close()


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


def _credentials(args: argparse.Namespace, state: _ServeState) -> CredentialInputs:
    """What serve's credential service hands the compiler now, from the keys and deny list read, written nowhere."""
    lead = args.key_publish_lead
    if lead is None:  # serve's default: one replica, or replicas sharing keys
        lead = shared_publish_lead(args.key_rotation) if args.store == "postgres" else CredentialOptions.publish_lead
    options = CredentialOptions(
        listen=args.exchange_address,
        public=args.exchange_public_address or args.exchange_address,
        state_dir=args.state_dir,
        rotate_every=args.key_rotation,
        publish_lead=lead,
        max_credential_ttl=args.max_credential_ttl,
    )
    keys = SigningKeys(
        _ReadOnly(state.keys),
        rotate_every=options.rotate_every,
        max_credential_ttl=options.max_credential_ttl,
        publish_lead=options.publish_lead,
    )
    now = time.time()
    revoked = tuple(sorted(job for job, until in state.revoked.items() if until > now))
    return CredentialInputs(
        jwks=keys.published_jwks(),
        exchange_address=options.public,
        exchange_tls=exchange_tls(args),
        revoked=revocation_buckets(revoked),
    )


class _ReadOnly:
    """A key store that hands out the keys read, never writes: validate must not rotate a running serve's keys."""

    def __init__(self, keys: Sequence[StoredKey]) -> None:
        self._keys = list(keys)

    def load(self) -> list[StoredKey]:
        return list(self._keys)

    def save(self, keys: Sequence[StoredKey]) -> None:
        pass
