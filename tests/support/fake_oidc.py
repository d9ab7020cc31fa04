"""Fake OIDC issuers: a shared base (keys, JWKS, discovery, signing) and a generic Okta/Entra-shaped one.

Why real HTTP and real RSA keys: Envoy's jwt_authn fetches the JWKS itself over a cluster and verifies RS256,
so the only honest test double is a server it can reach and keys it can check. Keys are generated per process
run (2048-bit, like GitLab's ``ci_jwt_signing_key``) and never written to disk.

``OidcIssuer`` holds everything issuer-agnostic; ``FakeGitLab`` (fake_gitlab.py) and ``FakeOidc`` (below)
only add their URL layout, discovery document and claim shape.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .backends import LoopbackHTTPServer, Request, Response, ServedOverLoopback, json_response


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Final = _Omit()
"""Use as a value in ``raw=`` to delete a claim a minter would otherwise set (e.g. a token with no
``exp``)."""


def rfc7638_thumbprint(public_jwk: Mapping[str, Any]) -> str:
    """GitLab's kid is the RFC 7638 SHA-256 thumbprint, so a fake must derive it the same way to be
    faithful."""
    canonical = json.dumps(
        {"e": public_jwk["e"], "kty": public_jwk["kty"], "n": public_jwk["n"]},
        separators=(",", ":"),
        sort_keys=True,
    )
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """An RSA key pair plus its JWK form. ``repr`` hides the private key so it cannot end up in a test log."""

    private_key: rsa.RSAPrivateKey
    kid: str
    public_jwk: Mapping[str, Any]

    @classmethod
    def generate(cls, bits: int = 2048) -> SigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        public = {"kty": "RSA", "n": jwk["n"], "e": jwk["e"]}
        kid = rfc7638_thumbprint(public)
        return cls(private, kid, {**public, "kid": kid, "use": "sig", "alg": "RS256"})

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"


def decode_unverified(token: str) -> dict[str, Any]:
    """Claims of a token without checking it; for asserting what a minter produced, never for
    authorization."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def apply_raw(claims: dict[str, Any], raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Last-word overrides: replace claims verbatim (wrong types included) or drop them with ``OMIT``."""
    for name, value in (raw or {}).items():
        if value is OMIT:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


class OidcIssuer(ServedOverLoopback):
    """Base for fake issuers: serves discovery and JWKS, counts JWKS fetches, signs tokens.

    Subclasses pass their URL layout, add routes in ``_add_routes`` and shape ``discovery()``.
    The server runs in its own thread, so the same object works from sync tests and from inside an event loop.
    """

    jwks_cache_control: ClassVar[str] = "max-age=86400, public, must-revalidate"
    server_name: ClassVar[str] = "oidc"

    def __init__(self, *, issuer_path: str, jwks_path: str, default_audience: str, port: int = 0) -> None:
        self.issuer_path = issuer_path
        self.jwks_path = jwks_path
        self.default_audience = default_audience
        self._server = LoopbackHTTPServer(name=self.server_name, port=port)
        self._lock = threading.Lock()
        self._signing_key = SigningKey.generate()
        self._published: tuple[SigningKey, ...] = (self._signing_key,)
        self.rogue = SigningKey.generate()
        """A key that is never published: tokens it signs must fail verification."""
        self._jwks_fetches = 0
        self._jwks_failure: int | None = None
        self._add_routes()

    # -- URLs ----------

    @property
    def issuer(self) -> str:
        """Exactly the ``iss`` of minted tokens; Envoy's provider ``issuer`` must equal it byte for byte."""
        return self.base_url + self.issuer_path

    @property
    def jwks_uri(self) -> str:
        return self.base_url + self.jwks_path

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    # -- keys ----------

    @property
    def signing_key(self) -> SigningKey:
        with self._lock:
            return self._signing_key

    @property
    def published_keys(self) -> tuple[SigningKey, ...]:
        with self._lock:
            return self._published

    def publish(self, keys: Sequence[SigningKey]) -> None:
        """Set exactly what the JWKS serves (the signing key is unchanged; publish it too if tokens should
        verify)."""
        with self._lock:
            self._published = tuple(keys)

    def rotate_key(self, *, keep_old: bool = False) -> SigningKey:
        """Sign with a fresh key from now on and publish it.

        The default mirrors a self-managed GitLab rotation: the old key is swapped out with no overlap, so
        tokens signed before the rotation stop verifying once the verifier refetches. ``keep_old=True``
        models an issuer that overlaps keys.
        """
        new = SigningKey.generate()
        with self._lock:
            self._published = (new, *self._published) if keep_old else (new,)
            self._signing_key = new
        return new

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(k.public_jwk) for k in self.published_keys]}

    @property
    def jwks_fetches(self) -> int:
        with self._lock:
            return self._jwks_fetches

    def fail_jwks(self, status: int | None = 503) -> None:
        """Make the JWKS endpoint answer ``status`` (``None`` restores it): models an issuer outage."""
        with self._lock:
            self._jwks_failure = status

    # -- signing ----------

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        key: SigningKey | None = None,
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """RS256-sign ``claims``. ``key`` picks the private key (e.g. ``rogue``) and ``kid`` overrides the
        header kid independently, so "right kid, wrong key" and "unknown kid" tokens are both one call
        away."""
        use = key or self.signing_key
        hdr = {"kid": kid if kid is not None else use.kid, "typ": "JWT", **(headers or {})}
        return jwt.encode(dict(claims), use.private_key, algorithm="RS256", headers=hdr)

    @staticmethod
    def times(
        *, ttl: int = 300, iat: int | None = None, exp: int | None = None, nbf: int | None = None
    ) -> tuple[int, int, int]:
        """(iat, nbf, exp) the way GitLab computes them: ``nbf = iat - 5``, ``exp = iat + ttl``."""
        now = int(time.time()) if iat is None else iat
        return now, (now - 5 if nbf is None else nbf), (now + ttl if exp is None else exp)

    @staticmethod
    def new_jti() -> str:
        return str(uuid.uuid4())

    # -- HTTP ----------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def _add_routes(self) -> None:
        router = self._server.router
        router.add("GET", self.issuer_path + "/.well-known/openid-configuration", self._serve_discovery)
        router.add("GET", self.jwks_path, self._serve_jwks)

    def _serve_discovery(self, _request: Request) -> Response:
        return json_response(self.discovery())

    def _serve_jwks(self, _request: Request) -> Response:
        with self._lock:
            self._jwks_fetches += 1
            failure = self._jwks_failure
        if failure is not None:
            return json_response({"error": "unavailable"}, status=failure)
        return json_response(self.jwks(), headers={"Cache-Control": self.jwks_cache_control})


class FakeOidc(OidcIssuer):
    """A generic (Okta/Entra-shaped) issuer: the issuer has a path and the JWKS lives under it.

    Its tokens identify a person, not a CI job: ``sub``, ``email`` and a ``groups`` list claim.
    """

    server_name = "fake-oidc"

    def __init__(
        self,
        *,
        issuer_path: str = "/oauth2/default",
        jwks_path: str | None = None,
        default_audience: str = "api://default",
    ) -> None:
        super().__init__(
            issuer_path=issuer_path,
            jwks_path=jwks_path or f"{issuer_path}/v1/keys",
            default_audience=default_audience,
        )

    def discovery(self) -> dict[str, Any]:
        doc = super().discovery()
        doc.update(
            {
                "authorization_endpoint": f"{self.issuer}/v1/authorize",
                "token_endpoint": f"{self.issuer}/v1/token",
                "userinfo_endpoint": f"{self.issuer}/v1/userinfo",
                "scopes_supported": ["openid", "profile", "email", "groups"],
                "claims_supported": ["iss", "sub", "aud", "iat", "exp", "jti", "email", "groups", "name"],
            }
        )
        return doc

    def mint(
        self,
        *,
        sub: str = "00u1abcd2EFGH3ijk4x5",
        email: str = "dev@example.com",
        groups: Sequence[str] = ("engineering",),
        name: str = "Dev Eloper",
        aud: str | Sequence[str] | None = None,
        ttl: int = 300,
        iat: int | None = None,
        exp: int | None = None,
        nbf: int | None = None,
        key: SigningKey | None = None,
        kid: str | None = None,
        raw: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """A signed ID token. ``nbf`` is only present when given (Okta omits it); ``raw`` has the last
        word."""
        issued, not_before, expires = self.times(ttl=ttl, iat=iat, exp=exp, nbf=nbf)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": self.default_audience if aud is None else (aud if isinstance(aud, str) else list(aud)),
            "iat": issued,
            "exp": expires,
            "jti": self.new_jti(),
            "email": email,
            "groups": list(groups),
            "name": name,
            "preferred_username": email,
        }
        if nbf is not None:
            claims["nbf"] = not_before
        claims.update(extra)
        return self.sign(apply_raw(claims, raw), key=key, kid=kid)
