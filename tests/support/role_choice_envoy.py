"""A static Envoy choosing a route by the job's verified token, without the control plane: a test issuer minting
RS256 tokens (its JWKS inlined in jwt_authn), the type URLs a hand-written bootstrap needs, and a request that
answers which route served it (each route answers with its own name).

Shared by the observed facts of route choice (tests/test_envoy_role_choice_facts.py) and the check that compiled
per-project role routes match on the real Envoy (tests/test_e2e_aws_role_attacks.py); it lives here because test
modules do not import each other (tests/test_no_test_imports.py).
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.ports import LOOPBACK

ISSUER = "https://ci.example"
JWT_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
HCM_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_URL = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class Issuer:
    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        self.jwks = json.dumps({"keys": [jwk | {"kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "s3", "sub": "job", "iat": now, "exp": now + 600} | claims
        return jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": "k1"})


def route_taken(port: int, token: str, **headers: str) -> tuple[int, str]:
    """(status, the role of the route that answered)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", "/b/k", headers={"Authorization": f"Bearer {token}", **headers})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()
