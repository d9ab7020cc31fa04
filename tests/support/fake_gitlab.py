"""A fake GitLab: OIDC discovery, the JWKS at GitLab's paths, and GitLab-shaped CI ID tokens.

It lives under tests/ only (it is not part of the ``controlplane`` package) because ``serve`` must never
trust it. Fidelity matters more than brevity here: the claim types are exactly GitLab's (every id and boolean
is a JSON string, ``runner_id`` is an int), because Envoy's RBAC ``string_match`` silently fails on any other
type, and a fake that got this wrong would let a broken policy compiler pass its tests.

REST endpoints will be added to ``router`` (see ``backends.Router``) as the GitLab source grows, e.g.
``gitlab.router.add("GET", "/api/v4/projects/{id}", handler)``.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .fake_oidc import OMIT, OidcIssuer, SigningKey, apply_raw, decode_unverified

__all__ = ["OMIT", "FakeGitLab", "SigningKey", "decode_unverified"]

_ids = itertools.count(1000)


class FakeGitLab(OidcIssuer):
    """GitLab's layout: ``iss`` is the bare base URL, discovery at ``/.well-known/openid-configuration``,
    JWKS at ``/oauth/discovery/keys`` (and the legacy ``/-/jwks``), ``Cache-Control: max-age=86400, public,
    must-revalidate``."""

    server_name: ClassVar[str] = "fake-gitlab"
    jwks_cache_control: ClassVar[str] = "max-age=86400, public, must-revalidate"

    def __init__(self, *, default_audience: str = "https://backend.example.com", port: int = 0) -> None:
        super().__init__(
            issuer_path="", jwks_path="/oauth/discovery/keys", default_audience=default_audience, port=port
        )

    def _add_routes(self) -> None:
        super()._add_routes()
        self.router.add("GET", "/-/jwks", self._serve_jwks)

    def discovery(self) -> dict[str, Any]:
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "introspection_endpoint": f"{base}/oauth/introspect",
            "userinfo_endpoint": f"{base}/oauth/userinfo",
            "jwks_uri": self.jwks_uri,
            "scopes_supported": ["api", "read_api", "read_user", "openid", "profile", "email"],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "grant_types_supported": [
                "authorization_code",
                "password",
                "client_credentials",
                "refresh_token",
            ],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claim_types_supported": ["normal"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "sub_legacy",
                "name",
                "nickname",
                "preferred_username",
                "email",
                "email_verified",
                "website",
                "profile",
                "picture",
                "groups",
                "groups_direct",
                "https://gitlab.org/claims/groups/owner",
                "https://gitlab.org/claims/groups/maintainer",
                "https://gitlab.org/claims/groups/developer",
            ],
            "code_challenge_methods_supported": ["plain", "S256"],
        }

    def mint(
        self,
        *,
        project_id: int | str = 42,
        project_path: str = "acme/deployer",
        namespace_id: int | str = 7,
        namespace_path: str | None = None,
        ref: str = "main",
        ref_type: str = "branch",
        ref_protected: bool = True,
        pipeline_source: str = "push",
        environment: str | None = None,
        environment_protected: bool = False,
        deployment_tier: str | None = None,
        aud: str | Sequence[str] | None = None,
        ttl: int = 300,
        iat: int | None = None,
        exp: int | None = None,
        nbf: int | None = None,
        key: SigningKey | None = None,
        kid: str | None = None,
        user_id: int | str = 1,
        user_login: str = "ci-user",
        user_email: str = "ci-user@example.com",
        user_access_level: str | None = "developer",
        pipeline_id: int | str | None = None,
        job_id: int | str | None = None,
        runner_id: int = 17,
        runner_environment: str = "self-hosted",
        project_visibility: str = "private",
        sha: str | None = None,
        raw: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """A signed CI ID token, claim for claim as ``Gitlab::Ci::JwtV2`` builds it.

        ids and booleans are converted to strings here, so callers may pass ``42``/``True``; to send a
        *wrong* type (to prove a matcher rejects it) use ``raw={"project_id": 42}``; ``raw={"exp": OMIT}``
        drops a claim. ``**extra`` adds claims verbatim (``groups_direct=[...]``). ``key=fake.rogue`` signs
        with the unpublished key; ``kid=`` sets the header kid independently of the key.
        """
        issued, not_before, expires = self.times(ttl=ttl, iat=iat, exp=exp, nbf=nbf)
        ns_path = namespace_path if namespace_path is not None else project_path.rpartition("/")[0]
        ref_path = f"refs/heads/{ref}" if ref_type == "branch" else f"refs/tags/{ref}"
        commit = sha or secrets.token_hex(20)
        host = self.base_url.split("://", 1)[1]
        claims: dict[str, Any] = {
            "namespace_id": str(namespace_id),
            "namespace_path": ns_path,
            "project_id": str(project_id),
            "project_path": project_path,
            "user_id": str(user_id),
            "user_login": user_login,
            "user_email": user_email,
            "user_access_level": user_access_level,
            "pipeline_id": str(pipeline_id if pipeline_id is not None else next(_ids)),
            "pipeline_source": pipeline_source,
            "job_id": str(job_id if job_id is not None else next(_ids)),
            "ref": ref,
            "ref_type": ref_type,
            "ref_path": ref_path,
            "ref_protected": _bool(ref_protected),
            "runner_id": int(runner_id),
            "runner_environment": runner_environment,
            "sha": commit,
            "project_visibility": project_visibility,
            "ci_config_ref_uri": f"{host}/{project_path}//.gitlab-ci.yml@{ref_path}",
            "ci_config_sha": commit,
            "job_project_id": str(project_id),
            "job_project_path": project_path,
            "job_namespace_id": str(namespace_id),
            "job_namespace_path": ns_path,
            "jti": self.new_jti(),
            "iss": self.issuer,
            "iat": issued,
            "nbf": not_before,
            "exp": expires,
            "sub": f"project_path:{project_path}:ref_type:{ref_type}:ref:{ref}",
            "aud": self.default_audience if aud is None else (aud if isinstance(aud, str) else list(aud)),
        }
        if environment is not None:
            claims["environment"] = environment
            claims["environment_protected"] = _bool(environment_protected)
            claims["deployment_tier"] = deployment_tier or _tier(environment)
            claims["environment_action"] = "start"
        claims.update(extra)
        return self.sign(apply_raw(claims, raw), key=key, kid=kid)


def _bool(value: bool | str) -> str:
    """GitLab sends booleans as ``build.protected.to_s``: the strings "true"/"false"."""
    if isinstance(value, str):
        return value
    return "true" if value else "false"


def _tier(environment: str) -> str:
    """GitLab's guess from the environment name, close enough for tests."""
    name = environment.lower()
    for tier, hints in (
        ("production", ("prod", "live")),
        ("staging", ("stag", "model", "pre")),
        ("testing", ("test", "qa")),
        ("development", ("dev", "review", "trunk")),
    ):
        if any(h in name for h in hints):
            return tier
    return "other"
