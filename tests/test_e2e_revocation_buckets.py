"""The compiled revocation buckets on a real Envoy: each bucket's regex is a full match on the `job_id` claim.

Envoy is fed by `TinyAds` (tests/support/ecds_envoy.py): a listener with jwt_authn (inline, payload in the same
metadata key the compiler's principals read) and the compiler's own 16 bucket filters and recent list
(`config_discovery`), whose configurations are the compiler's resources. Every request passes all 17 filters, so
each job id below is matched against every bucket's regex, not only its own bucket's: a listed `123` must deny
neither `12` nor `1234`. Observed facts: docs/envoy-ecds.md §9.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import extension_pb2
from google.protobuf import json_format
from jwt.algorithms import ECAlgorithm

from controlplane.cli.bootstrap import RE2_MAX_PROGRAM_SIZE, RE2_PROGRAM_SIZE_KEY
from controlplane.compiler.listener import revocation_bucket_filters
from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter
from controlplane.compiler.revocations import bucket_config_bytes
from controlplane.model.credentials import revocation_bucket, revocation_buckets
from tests.support.ecds_envoy import (
    ECDS,
    LISTENER_STATS,
    Client,
    ecds_stat,
    envoy_on_ads,
    listener_stats,
    live_listener,
    once,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

ISSUER, AUDIENCE = "https://ci.invalid", "gateway"
LISTED = ["123", "1005", "40005", "100123", "8000012001", "8000012003", "8000012177", "8000060001", "runner-x.1"]
DENIED = LISTED
PASSING = [
    "12",  # a prefix of a listed id, same bucket
    "1234",  # a listed id is its prefix
    "1",
    "0123",
    "1006",  # unlisted, in a non-empty bucket
    "8000012000",
    "8000012002",
    "8000012178",
    "80000120011",
    "800001200",
    "runner-xx1",  # `.` is escaped
    "x123",
]


class Issuer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**jwk, "kid": "k", "alg": "ES256", "use": "sig"}]})

    def authorization(self, job_id: str) -> str:
        claims = {"iss": ISSUER, "aud": AUDIENCE, "job_id": job_id, "exp": int(time.time()) + 600}
        return "Bearer " + jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k"})


def jwt_filter(jwks: str) -> dict[str, Any]:
    """jwt_authn as the gateway configures it where it matters here: the payload under `jwt_payload`."""
    provider = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": jwks},
        "payload_in_metadata": "jwt_payload",
    }
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"ci": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "ci"}}],
    }
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": config}


def put_buckets(ads: Any, job_ids: list[str], recent: Sequence[str] = ()) -> None:
    """`job_ids` sealed in their buckets, `recent` in the recent list: as compile.revocation_resources emits them,
    buckets first."""
    lists = [(revocation_bucket_filter(i), ids) for i, ids in enumerate(revocation_buckets(job_ids))]
    for name, ids in [*lists, (REVOKED_RECENTLY_FILTER, tuple(sorted(recent)))]:
        config = extension_pb2.TypedExtensionConfig.FromString(bucket_config_bytes(name, ids))
        ads.put(ECDS, config.name, config)


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_a_bucket_regex_denies_exactly_its_listed_job_ids(api: str) -> None:
    assert len({revocation_bucket(j) for j in LISTED}) >= 4  # several buckets hold ids
    issuer, port = Issuer(), free_port()
    buckets = [json_format.MessageToDict(f, preserving_proto_field_name=True) for f in revocation_bucket_filters()]
    with envoy_on_ads(api, runtime={RE2_PROGRAM_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}) as (ads, envoy):
        put_buckets(ads, LISTED)
        live_listener(ads, envoy, port, [jwt_filter(issuer.jwks()), *buckets])
        client = _connected(envoy, port)
        statuses = {job: client.status(authorization=issuer.authorization(job)) for job in DENIED + PASSING}
        assert statuses == {**dict.fromkeys(DENIED, 403), **dict.fromkeys(PASSING, 200)}
        assert client.status() == 401  # no token: jwt_authn refuses before any bucket
        listeners = listener_stats(envoy)

        # One more revocation changes the recent list: enforced on the same connection, the listener untouched.
        bucket = f"controlplane.revoked_jobs.{revocation_bucket('1006'):02d}"
        reloads = {name: ecds_stat(envoy, name, "config_reload") for name in (bucket, REVOKED_RECENTLY_FILTER)}
        put_buckets(ads, LISTED, ["1006"])
        envoy.wait_for(
            lambda: client.status(authorization=issuer.authorization("1006")) == 403, 5, "1006 denied", interval=0.005
        )
        assert client.status(authorization=issuer.authorization("1005")) == 403
        assert client.status(authorization=issuer.authorization("1007")) == 200
        assert listener_stats(envoy) == listeners == dict.fromkeys(LISTENER_STATS, 0)
        assert ecds_stat(envoy, REVOKED_RECENTLY_FILTER, "config_reload") == reloads[REVOKED_RECENTLY_FILTER] + 1
        assert ecds_stat(envoy, bucket, "config_reload") == reloads[bucket]

        # The seal, make before break: 1006 joins its bucket, then leaves the recent list; denied throughout.
        statuses: list[int] = []
        with hammering(lambda: statuses.append(client.status(authorization=issuer.authorization("1006")))):
            put_buckets(ads, [*LISTED, "1006"], ["1006"])
            envoy.wait_for(lambda: ecds_stat(envoy, bucket, "config_reload") == reloads[bucket] + 1, 5, "sealed")
            put_buckets(ads, [*LISTED, "1006"])
            envoy.wait_for(
                lambda: (
                    ecds_stat(envoy, REVOKED_RECENTLY_FILTER, "config_reload") == reloads[REVOKED_RECENTLY_FILTER] + 2
                ),
                5,
                "settled",
            )
        assert statuses and set(statuses) == {403}, statuses
        assert client.status(authorization=issuer.authorization("1007")) == 200
        assert listener_stats(envoy) == dict.fromkeys(LISTENER_STATS, 0)
        assert not ads.nacks
        client.close()


@contextlib.contextmanager
def hammering(request: Callable[[], None]) -> Iterator[None]:
    """`request` over and over on this thread's behalf in another one, while the block runs (at least once)."""
    stop = threading.Event()

    def loop() -> None:
        request()
        while not stop.is_set():
            request()

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(10)


def _connected(envoy: Any, port: int) -> Client:
    """The listener warms until all 16 buckets arrived (the port refuses until then); then one keep-alive
    connection."""
    envoy.wait_for(lambda: once(port) == 401, 10, "the listener, its 16 buckets arrived")
    return Client(port)


# Job ids GitLab never sends (its are decimal), which a bucket must still match exactly if one is ever listed:
# RE2's escaping of ASCII punctuation, whitespace and control characters, non-ASCII digits, and the empty id
# (alone in its bucket: the regex would be empty, which Envoy's RegexMatcher refuses).
ODD_LISTED = ["", " 7", "a|b", "(x)", "[1]", "x*", "\\", "^$", "\t\n", "١٢٣", "+123", "0100042", "a\x00b", "é.ü"]
ODD_PASSING = ["7", "a", "b", "x", "xx", "1", "^", "$", "\t", "123", "100042", "00100042", "a", "éxü", "ab", "\\\\"]


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_odd_job_ids_are_matched_exactly(api: str) -> None:
    assert revocation_bucket("") not in {revocation_bucket(j) for j in ODD_LISTED if j}  # "" alone in its bucket
    issuer, port = Issuer(), free_port()
    buckets = [json_format.MessageToDict(f, preserving_proto_field_name=True) for f in revocation_bucket_filters()]
    with envoy_on_ads(api, runtime={RE2_PROGRAM_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}) as (ads, envoy):
        put_buckets(ads, ODD_LISTED)
        live_listener(ads, envoy, port, [jwt_filter(issuer.jwks()), *buckets])
        client = _connected(envoy, port)
        statuses = {job: client.status(authorization=issuer.authorization(job)) for job in ODD_LISTED + ODD_PASSING}
        assert statuses == {**dict.fromkeys(ODD_LISTED, 403), **dict.fromkeys(ODD_PASSING, 200)}
        assert not ads.nacks
        client.close()


def test_a_bucket_past_re2s_program_size_limit_is_still_enforced() -> None:
    """250,000 ids of one bucket, each in its own thousand-block (nothing shared but the leading digits): one
    regex of them is an RE2 program over the 1,000,000 `controlplane bootstrap` allows, which Envoy refuses,
    keeping the bucket's previous configuration (its new ids not denied). The compiler splits such a bucket
    into several principals, each regex well under the limit. Unreachable in practice (3-4 million outstanding
    revocations spread over 16 buckets), but a bucket must never be refused for its size."""
    listed = [str(256_000 * (3907 + k) + (k * 7919) % 16_000) for k in range(250_000)]
    assert {revocation_bucket(j) for j in listed} == {0}
    issuer, port = Issuer(), free_port()
    buckets = [json_format.MessageToDict(f, preserving_proto_field_name=True) for f in revocation_bucket_filters()]
    with envoy_on_ads("delta", runtime={RE2_PROGRAM_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}) as (ads, envoy):
        put_buckets(ads, ["5"])
        live_listener(ads, envoy, port, [jwt_filter(issuer.jwks()), *buckets])
        client = _connected(envoy, port)
        assert client.status(authorization=issuer.authorization("5")) == 403
        put_buckets(ads, listed)
        bucket = "controlplane.revoked_jobs.00"
        envoy.wait_for(
            lambda: ecds_stat(envoy, bucket, "update_success") + ecds_stat(envoy, bucket, "update_rejected") >= 2,
            30,
            "the big bucket accepted or refused",
        )
        assert not ads.nacks
        for job in (listed[0], listed[-1], listed[123_457]):
            assert client.status(authorization=issuer.authorization(job)) == 403, job
        for job in ("5", str(int(listed[1]) + 1), "1000000001"):
            assert client.status(authorization=issuer.authorization(job)) == 200, job
        client.close()
