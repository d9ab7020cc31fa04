"""Authentication: one jwt_authn provider per issuer (and one for the control plane's own credentials), one
audience requirement per backend.

Extraction is explicit (`Authorization: Bearer`), otherwise Envoy would also accept `?access_token=`
(docs/envoy-filters.md#where-a-token-is-read); the token is never forwarded upstream; claims land in
dynamic metadata for RBAC and the access log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from envoy.config.core.v3 import backoff_pb2, base_pb2, http_uri_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt
from google.protobuf.wrappers_pb2 import UInt32Value

from controlplane.compiler import wire
from controlplane.compiler.names import (
    HEADER_KEY,
    PAYLOAD_KEY,
    jwks_cluster,
)
from controlplane.compiler.util import millis, seconds, serialized
from controlplane.model.credentials import CredentialInputs
from controlplane.model.policy import Issuer, JwksMode

JWT_CACHE_SIZE = 10_000

# Inlined for a relayed issuer whose keys the control plane does not hold yet (offline compile, or the issuer
# unreachable since start). Envoy rejects `{"keys":[]}` ("Jwks doesn't have any valid public key"), so this is
# one valid RSA public key whose private half was discarded when it was generated: the config loads and every
# token fails verification (fail closed), with the same bytes every time (golden snapshots, stable versions).
PLACEHOLDER_KID = "controlplane-no-keys-yet"
PLACEHOLDER_JWKS = (
    '{"keys":[{"alg":"RS256","e":"AQAB","kid":"controlplane-no-keys-yet","kty":"RSA","n":"'
    "6ko0fuDjBioZKLk8xlIG5nTkLS9-9e-Q6VKdtBpxTyHhMjlEeC8dFWmqL46KUXsmOKHIp2K3eL57g-rcPsFVEFMe4tR1sCXTxD6oSlJP4hesj3"
    "hpMCS-1wqBnXVCqZxl_R208bKqVWuJOIOeJ_fi3srPkZXQBtbCx5IxTrdjCPSxErKQt6JrPavU0nsclFOfKUs_PX3-EhxrPGCPxEMMAgF2Wp"
    "AyoihSGHtyNohKsWtS-yUNKfX_eumEJlhRqL3BWG90F6yR8_tvK3M2V73LQU2qrCixJTYXkOKBzn7TbiCrYBAifSk088wkbdjibYuHlrg6NKz"
    'GouX7leLf3kd9Rw","use":"sig"}]}'
)


def provider(
    issuer: Issuer, audiences: Sequence[str], keys: str | None = None, clear_route_cache: bool = False
) -> jwt.JwtProvider:
    """`keys` is the relayed JWKS (canonical JSON) of a RELAY issuer; ignored for REMOTE ones.
    `clear_route_cache`: the route is chosen again once the token's payload is in dynamic metadata, for the routes
    choosing a binding's AWS role (docs/aws-backends.md fact 7); set only for issuers of such bindings, as it costs
    a second route match per request."""
    config = _verified_provider(issuer.url, audiences, issuer.clock_skew_seconds)
    config.clear_route_cache = clear_route_cache
    if issuer.jwks_mode is JwksMode.REMOTE:
        config.remote_jwks.CopyFrom(_remote_jwks(issuer))
    else:
        config.local_jwks.inline_string = keys or PLACEHOLDER_JWKS
    return config


def credential_provider(credentials: CredentialInputs, audiences: Sequence[str]) -> jwt.JwtProvider:
    """The control plane's own credentials: keys inline (pushed on rotation, so no fetch and no cache delay)."""
    config = _verified_provider(credentials.issuer, audiences, CREDENTIAL_CLOCK_SKEW_SECONDS)
    config.local_jwks.inline_string = credentials.jwks or PLACEHOLDER_JWKS
    return config


# Envoy accepts a credential this long past its `exp`: a key, or a revocation entry, must outlive its last
# credential's `exp` by as much. Small, since the control plane and the fleet keep their clocks in sync.
CREDENTIAL_CLOCK_SKEW_SECONDS = 10


def _verified_provider(issuer_url: str, audiences: Sequence[str], clock_skew_seconds: int) -> jwt.JwtProvider:
    """What every provider shares: Bearer extraction only, never forwarded, claims in metadata, a JWT cache.

    No `failed_status_in_metadata`: a requirement tries each of its providers, and every provider whose
    issuer is not the token's records "Jwt issuer is not configured" under that key, also when another
    provider accepts the token; the last writer wins, so a refused token could be recorded with another
    provider's reason. Envoy's response details carry the real one (see access_log)."""
    return jwt.JwtProvider(
        issuer=issuer_url,
        audiences=sorted(set(audiences)),
        require_expiration=True,
        clock_skew_seconds=clock_skew_seconds,
        from_headers=[jwt.JwtHeader(name="Authorization", value_prefix="Bearer ")],
        forward=False,
        payload_in_metadata=PAYLOAD_KEY,
        header_in_metadata=HEADER_KEY,
        jwt_cache_config=jwt.JwtCacheConfig(jwt_cache_size=JWT_CACHE_SIZE),
    )


def _remote_jwks(issuer: Issuer) -> jwt.RemoteJwks:
    """Every Envoy fetches the keys itself through the `jwks-<issuer>` cluster (no refetch on an unknown kid:
    docs/envoy-filters.md#issuer-keys)."""
    return jwt.RemoteJwks(
        http_uri=http_uri_pb2.HttpUri(uri=issuer.jwks_uri, cluster=jwks_cluster(issuer.name), timeout=seconds(2)),
        cache_duration=seconds(issuer.jwks_cache_seconds),
        # Fetch before the listener serves, so the first job is not refused while keys load.
        async_fetch=jwt.JwksAsyncFetch(fast_listener=False, failed_refetch_duration=seconds(5)),
        retry_policy=base_pb2.RetryPolicy(
            num_retries=UInt32Value(value=3),
            retry_back_off=backoff_pb2.BackoffStrategy(base_interval=millis(200), max_interval=seconds(2)),
        ),
    )


def requirement(providers: Sequence[str], audience: str) -> jwt.JwtRequirement:
    """A token from any of `providers`, carrying this backend's audience (a wrong audience is a 403:
    docs/envoy-filters.md#answers-401-and-403)."""
    alternatives = [
        jwt.JwtRequirement(provider_and_audiences=jwt.ProviderWithAudiences(provider_name=p, audiences=[audience]))
        for p in sorted(set(providers))
    ]
    return _any_of(alternatives)


def any_provider(providers: Sequence[str]) -> jwt.JwtRequirement:
    return _any_of([jwt.JwtRequirement(provider_name=p) for p in sorted(set(providers))])


def _any_of(alternatives: Sequence[jwt.JwtRequirement]) -> jwt.JwtRequirement:
    if len(alternatives) == 1:
        return alternatives[0]
    return jwt.JwtRequirement(requires_any=jwt.JwtRequirementOrList(requirements=alternatives))


def authentication_bytes(providers: Mapping[str, jwt.JwtProvider], requirements: Sequence[tuple[str, bytes]]) -> bytes:
    """Serialized JwtAuthentication. `providers` by provider name (see `provider`, `credential_provider`);
    `requirements` are the backends' requirements by name, already serialized (one per distinct audience and
    set of providers, so up to thousands: they are appended as wire-level map entries instead of being rebuilt
    as messages).

    The filter-level rule (a token from any provider) only decides requests no virtual host claims:
    they are then denied by the filter-level RBAC, but a missing token still reads as 401.
    """
    config = jwt.JwtAuthentication(providers=providers)
    if providers:
        config.rules.append(
            jwt.RequirementRule(
                match=route_components_pb2.RouteMatch(prefix="/"), requires=any_provider(list(providers))
            )
        )
    head = serialized(config)
    return head + b"".join(wire.map_entry(_REQUIREMENT_MAP, name, r) for name, r in sorted(requirements))


_REQUIREMENT_MAP = wire.number(jwt.JwtAuthentication, "requirement_map")


def per_route_requirement(name: str) -> jwt.PerRouteConfig:
    return jwt.PerRouteConfig(requirement_name=name)


def per_route_disabled() -> jwt.PerRouteConfig:
    return jwt.PerRouteConfig(disabled=True)


def jwks_endpoint(issuer: Issuer) -> tuple[str, int, bool]:
    """Host, port and whether TLS is used, for the cluster a REMOTE issuer's keys are fetched through."""
    parts = urlsplit(issuer.jwks_uri)
    tls = parts.scheme == "https"
    return parts.hostname or "", parts.port or (443 if tls else 80), tls
