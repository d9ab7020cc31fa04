"""Job tokens of a test's own OIDC issuer, for tests that compile a policy and feed Envoy themselves: the JWKS is
relayed to Envoy inline by the compiler (`compile_policy(keys=...)`), so no issuer needs to be served."""

from __future__ import annotations

import json
import time
import urllib.request

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class Jobs:
    """Signs ten-minute job tokens for `issuer` and `audience` with one RSA key (`kid` k1); `jwks` is its JWKS."""

    def __init__(self, issuer: str, audience: str) -> None:
        self._issuer, self._audience = issuer, audience
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        self.jwks = json.dumps({"keys": [jwk | {"kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(self, sub: str) -> str:
        now = int(time.time())
        claims = {"iss": self._issuer, "aud": self._audience, "sub": sub, "iat": now, "exp": now + 600}
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": "k1"})


def served_jwks(issuer_url: str) -> str:
    """What a cloud does with an issuer it trusts: fetch its JWKS over HTTP (serve's exchange listener serves it)."""
    with urllib.request.urlopen(issuer_url + "/.well-known/jwks.json", timeout=5) as answer:
        return str(answer.read().decode())
