"""`serve`'s options, each with its one default: `serve` reads them, and the command line (cli/main.py) takes its
flags' defaults from them. Kept apart from cli/serve.py so that building the parser for any command does not
import the xDS server, gRPC and the admin server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.audit.store import DEFAULT_RETENTION
from controlplane.runtime.gc_control import DEFAULT_FULL_EVERY, DEFAULT_INTERVAL
from controlplane.runtime.readiness import DEFAULT_RELOAD_TIMEOUT
from controlplane.runtime.supervisor import DEFAULT_STOP_DEADLINE
from controlplane.serving import ADMIN_LIMITS, LOOPBACK, WEBHOOK_LIMITS, HttpLimits, fit_listeners
from controlplane.sources.jwks import DEFAULT_REFRESH_INTERVAL
from controlplane.sources.policy_dir import DEFAULT_LIMITS, ReadLimits
from controlplane.sources.watch import DEFAULT_MAX_WAIT, DEFAULT_QUIET
from controlplane.statefile import default_state_dir

if TYPE_CHECKING:
    from controlplane.credentials.key_cipher import KeyCipher
    from controlplane.credentials.service import CredentialOptions
    from controlplane.store.dsn import StoreDsn
    from controlplane.store.pool import PoolSettings
    from controlplane.xds.tls import ServerTls


@dataclass(frozen=True)
class GitLabPolicyOptions:
    """The policy lives in a GitLab project (instead of a directory)."""

    url: str
    project: str
    token_env: str | None = None
    token_file: str | None = None
    poll_seconds: float = 60.0  # a push webhook reloads at once; polling catches missed hooks

    @property
    def project_ref(self) -> int | str:
        """How GitLab's API is asked for the project: digits are its id, anything else its path."""
        return int(self.project) if self.project.isdigit() else self.project


@dataclass(frozen=True)
class WebhookOptions:
    host: str
    port: int
    secret_env: str | None = None
    secret_file: str | None = None


STORE_KINDS = ("file", "postgres")


@dataclass(frozen=True)
class StoreOptions:
    """Where the exchange's replay counts and finished jobs live: `file` (SQLite in the state directory, one
    host) or `postgres` (shared by replicas, docs/shared-state.md), with the DSN's one source. A DSN given as
    an argument must hold no password (store/dsn.py says why; it validates every source)."""

    kind: str = "file"
    dsn: str | None = None  # --store-dsn URL, without a password
    dsn_env: str | None = None  # --store-dsn-env NAME
    dsn_file: Path | None = None  # --store-dsn-file PATH
    # The signing keys' key-encryption key (credentials/key_cipher.py), never argv: --store-key-env NAME,
    # --store-key-file PATH; required with `postgres` when credentials are on.
    key_env: str | None = None
    key_file: Path | None = None
    replica_id: str | None = None  # --replica-id: this replica's name in the registry; default a new uuid
    leader_retry: float = 1.0  # --leader-retry: seconds between a follower's tries of the leader lock
    pool_size: int = 8  # --store-pool-size: connections at most, for every shared store together
    timeout: float = 5.0  # --store-timeout: one connect, one wait for a pooled connection, one statement
    unready_after: float = 10.0  # --store-unready-after: the store unreachable this long makes /readyz 503

    def __post_init__(self) -> None:
        if self.kind not in STORE_KINDS:
            raise ValueError(f"store kind must be one of {', '.join(STORE_KINDS)}, got {self.kind!r}")
        if not 2 <= self.pool_size <= 100:
            raise ValueError(f"--store-pool-size must be 2 to 100, got {self.pool_size}")
        if not 0.5 <= self.timeout <= 60:
            raise ValueError(f"--store-timeout must be 0.5 to 60 seconds, got {self.timeout:g}")
        if not 0 < self.unready_after <= 3600:
            raise ValueError(
                f"--store-unready-after must be more than 0 and at most 3600 seconds, got {self.unready_after:g}"
            )
        if not 0 < self.leader_retry <= 60:
            raise ValueError(f"--leader-retry must be more than 0 and at most 60 seconds, got {self.leader_retry:g}")
        if self.replica_id is not None and not (0 < len(self.replica_id) <= 128 and self.replica_id.isprintable()):
            raise ValueError("--replica-id must be 1 to 128 printable characters")

    def resolve_dsn(self) -> StoreDsn | None:
        """The PostgreSQL DSN (None for `file`); raises store.dsn.DsnError naming the flag, never the password."""
        from controlplane.store.dsn import DsnError, resolve

        sources = (self.dsn, self.dsn_env, self.dsn_file)
        if self.kind == "file":
            if any(source is not None for source in sources):
                raise DsnError("--store-dsn, --store-dsn-env and --store-dsn-file need --store postgres")
            if self.replica_id is not None or self.leader_retry != StoreOptions.leader_retry:
                raise DsnError("--replica-id and --leader-retry need --store postgres (one file store, one replica)")
            return None
        return resolve(store=self.dsn, dsn_env=self.dsn_env, dsn_file=self.dsn_file)

    def pool_settings(self) -> PoolSettings:
        from controlplane.store.pool import PoolSettings

        timeout = self.timeout
        return PoolSettings(
            min_size=1,
            max_size=self.pool_size,
            connect_timeout=timeout,
            acquire_timeout=timeout,
            statement_timeout=timeout,
        )

    def key_cipher(self) -> KeyCipher:
        """What seals the signing keys in PostgreSQL; raises key_cipher.KekError naming the source, never the KEK."""
        from controlplane.credentials.key_cipher import resolve

        return resolve(key_env=self.key_env, key_file=self.key_file)

    def check_key_source(self, *, credentials: bool) -> None:
        """A usage error (KekError) when the KEK source does not fit: missing with `postgres` and credentials,
        or given where nothing uses it. Reads and validates the KEK, so a bad one stops the start at once."""
        from controlplane.credentials.key_cipher import KekError

        given = self.key_env is not None or self.key_file is not None
        if self.kind == "postgres" and credentials:
            self.key_cipher()
        elif given:
            raise KekError("--store-key-env and --store-key-file need --store postgres and the token exchange")


@dataclass(frozen=True)
class ServeOptions:
    """Every `serve` option with its one default; the command line (cli/main.py) reads its defaults here."""

    policy: Path
    xds_host: str = LOOPBACK
    xds_port: int = 18000
    admin_host: str = LOOPBACK
    admin_port: int = 9902
    debounce: float = DEFAULT_QUIET
    max_wait: float = DEFAULT_MAX_WAIT
    shutdown_grace: float = 5.0  # the xDS streams' drain
    stop_deadline: float = DEFAULT_STOP_DEADLINE  # every stop together, the drain included; then exit 1 at once
    gc_interval: float = DEFAULT_INTERVAL  # seconds between scheduled collections (gc_control.py); 0: CPython's
    gc_full_every: int = DEFAULT_FULL_EVERY  # N > 1: only every Nth is full, the others skip what earlier ones kept
    jwks_refresh: float = DEFAULT_REFRESH_INTERVAL
    # How long start-up waits for relayed issuers' first keys before serving xDS: an Envoy reconnecting to a
    # restarted control plane must not be sent the placeholder keys (every token refused) in the meantime.
    jwks_startup_wait: float = 10.0
    # The same for the first GitLab inventory read (until then GitLab-backed bindings are withdrawn).
    gitlab_startup_wait: float = 15.0
    state_dir: Path = field(default_factory=default_state_dir)  # $CONTROLPLANE_STATE_DIR, as on the command line
    policy_gitlab: GitLabPolicyOptions | None = None
    webhooks: WebhookOptions | None = None
    credentials: CredentialOptions | None = None
    store: StoreOptions = StoreOptions()  # the exchange's state: SQLite in state_dir, or a shared PostgreSQL
    audit_db: Path | None = None  # default: <state_dir>/audit.store.DB_NAME
    audit_retention: float = DEFAULT_RETENTION
    xds_tls: ServerTls | None = None  # mTLS on the xDS port; None: plain text
    xds_insecure: bool = False  # plain text explicitly allowed even when the policy pushes secrets
    admin_limits: HttpLimits = ADMIN_LIMITS  # connections and timeouts per HTTP listener (serving.py)
    webhook_limits: HttpLimits = WEBHOOK_LIMITS
    xds_max_connections: int | None = None  # None: unbounded here; `serve` derives it from the open-file limit
    policy_limits: ReadLimits = DEFAULT_LIMITS  # size bounds of the policy tree (directory or GitLab project)
    reload_timeout: float = DEFAULT_RELOAD_TIMEOUT  # a reload running longer makes the server not ready
    # Backends naming Kubernetes Services: the API server from this kubeconfig; None: the pod's service account.
    kubeconfig: Path | None = None
    kube_context: str | None = None  # the kubeconfig's context; None: its current-context
    # Networks whose discovered endpoints are served although refused by default (sources/kubernetes_slices.py).
    kube_allow_endpoints: tuple[IPv4Network | IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        if not self.stop_deadline > self.shutdown_grace:
            raise ValueError(
                f"stop_deadline ({self.stop_deadline}s) must exceed shutdown_grace ({self.shutdown_grace}s)"
            )

    def fitted_to(self, open_files: int) -> ServeOptions:
        """These options with every listener that is on bounded within the open-file limit (serving.py decides
        how; this only says which listeners there are)."""
        http = {"admin": self.admin_limits}
        if self.webhooks is not None:
            http["webhook"] = self.webhook_limits
        if self.credentials is not None:
            http["exchange"] = self.credentials.http
        fitted, xds = fit_listeners(open_files, http, self.xds_max_connections)
        credentials = self.credentials
        if credentials is not None:
            credentials = replace(credentials, http=fitted["exchange"])
        return replace(
            self,
            xds_max_connections=xds,
            admin_limits=fitted["admin"],
            webhook_limits=fitted.get("webhook", self.webhook_limits),
            credentials=credentials,
        )
