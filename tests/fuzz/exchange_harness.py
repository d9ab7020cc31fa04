"""The token exchange under fuzzing: its policy, the issuer's keys, a fixed clock, and subject tokens built field
by field (any header, claims, signer or encoding). Shared by the Hypothesis suite, the findings' reproducers and
the atheris target, so all three exercise the same exchange.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.credentials.exchange import (
    ExchangePolicy,
    TokenExchange,
)
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.model.loader import parse_policy
from controlplane.resolved.index import Resolution
from controlplane.sources.jwks import normalize_jwks

ISS = "https://gitlab.example.com"
AUDIENCE = "https://reports.local"
KID = "gitlab-key-1"
TTL = 600
NOW = float(int(time.time()))
POLICY = {
    "policy.yaml": f"""
kind: Issuer
name: gitlab
type: gitlab
url: {ISS}
---
kind: Backend
name: reports-api
hosts: [reports.local]
audience: {AUDIENCE}
endpoints: [{{address: 127.0.0.1, port: 8081}}]
---
kind: Backend
name: other-api
hosts: [other.local]
endpoints: [{{address: 127.0.0.1, port: 8082}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET]}}]
---
kind: Role
name: reports-write
backend: reports-api
rules: [{{methods: [POST]}}]
---
kind: Role
name: other-read
backend: other-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: readers
roles: [reports-read, other-read]
credential_ttl: {TTL}s
subjects: [{{project: 42, ref_protected: true}}]
"""
}

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROGUE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _jwks() -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    keys = [
        {**jwk, "kid": KID, "alg": "RS256", "use": "sig"},
        {**ec_jwk, "kid": "ec-key", "alg": "ES256", "use": "sig"},
    ]
    return normalize_jwks(json.dumps({"keys": keys}))[0].canonical


@dataclass
class Exchange:
    exchange: TokenExchange
    keys: SigningKeys


def make_exchange(state: Path) -> Exchange:
    """The exchange over POLICY, the harness's issuer key and a fixed clock; signing keys kept under `state`."""
    policy = parse_policy(POLICY)
    built = ExchangePolicy.build(policy, Resolution().update(policy))
    relayed = _jwks()
    keys = SigningKeys(
        FileKeyStore(state / "keys.json"),
        rotate_every=86400,
        max_credential_ttl=3600,
        publish_lead=60,
        clock=lambda: NOW,
    )
    exchange = TokenExchange(
        keys=keys,
        issuer_keys=lambda name: relayed if name == "gitlab" else None,
        policy=lambda: built,
        clock=lambda: NOW,
        max_uses_per_subject=10**9,  # replay counting is tested elsewhere; here every valid request must pass
    )
    return Exchange(exchange, keys)


# --- subject tokens --------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Token:
    header: dict[str, Any]
    claims: dict[str, Any]
    signer: str = "rs256"  # rs256 | es256 | rogue | hs256-public-pem | none | garbage | empty
    header_json: str | None = None  # written as is instead of json.dumps(header)
    claims_json: str | None = None
    encoding: list[str] = field(default_factory=list)

    def text(self) -> str:
        header = self.header_json if self.header_json is not None else json.dumps(self.header)
        claims = self.claims_json if self.claims_json is not None else json.dumps(self.claims)
        signing_input = (
            b64(header.encode("utf-8", "surrogatepass")) + "." + b64(claims.encode("utf-8", "surrogatepass"))
        )
        token = signing_input + "." + b64(_signature(self.signer, signing_input.encode()))
        for edit in self.encoding:
            token = _encode_edit(token, edit)
        return token


def _signature(signer: str, data: bytes) -> bytes:
    algorithms = jwt.algorithms.get_default_algorithms()
    if signer == "rs256":
        return algorithms["RS256"].sign(data, RSA_KEY)
    if signer == "es256":
        return algorithms["ES256"].sign(data, EC_KEY)
    if signer == "rogue":
        return algorithms["RS256"].sign(data, ROGUE_KEY)
    if signer == "hs256-public-pem":  # alg confusion: the issuer's public key as an HMAC secret
        import hashlib
        import hmac

        return hmac.new(PUBLIC_PEM, data, hashlib.sha256).digest()
    if signer == "garbage":
        return b"\x00" * 256
    return b""


def _encode_edit(token: str, edit: str) -> str:
    head, _, _rest = token.partition(".")
    return {
        "pad": token.replace(".", "==.", 1),
        "std-alphabet": token.replace("-", "+").replace("_", "/"),
        "space": token[:10] + " " + token[10:],
        "newline": token + "\n",
        "extra-segment": token + ".e30",
        "two-segments": token.rsplit(".", 1)[0],
        "one-segment": head,
        "empty-segments": "..",
        "non-ascii": token[:5] + "é" + token[5:],
        "truncated": token[: len(token) // 2],
        "bearer": "Bearer " + token,
        "nul": token + "\x00",
    }[edit]


def pristine_claims(jti: str) -> dict[str, Any]:
    return {
        "iss": ISS,
        "aud": AUDIENCE,
        "sub": "project_path:acme/app:ref_type:branch:ref:main",
        "jti": jti,
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 300,
        "project_id": "42",
        "project_path": "acme/app",
        "namespace_id": "7",
        "ref": "main",
        "ref_type": "branch",
        "ref_protected": "true",
        "job_id": "5001",
        "pipeline_id": "900",
    }
