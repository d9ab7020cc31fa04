"""Policy documents for the suites that write their own policy: one function a kind, joined by `documents`.

Most suites serve a GitLab issuer, one or two backends on echo servers, a role a backend, a binding and one
gateway; what differs is a line or two (exchanged credentials, a TTL, an injected secret). Written once here,
each suite's policy still reads top to bottom at its call site, and a change to the policy language's shape
is made in one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

# Two projects in acme/platform: the deployer (42) and another (43), as an issuer's `inventory` file.
ACME_INVENTORY = """\
groups:
  - {id: 10, path: acme}
  - {id: 11, path: acme/platform, parent_id: 10}
projects:
  - {id: 42, path: acme/platform/deployer, namespace_id: 11}
  - {id: 43, path: acme/platform/other, namespace_id: 11}
"""
TTL_10M = "credential_ttl: 10m"  # a binding's `extra`: the exchanged credential lives ten minutes


def documents(*parts: str) -> str:
    """One YAML stream of `parts`, in the order given."""
    return "---\n".join(parts)


def issuer(url: str, *, name: str = "gitlab", kind: str = "gitlab", extra: str = "") -> str:
    """An Issuer; `extra` is YAML lines added as they are (inventory, api, jwks)."""
    return f"kind: Issuer\nname: {name}\ntype: {kind}\nurl: {url}\n{_lines(extra)}"


def backend(name: str, port: int, *, host: str | None = None, audience: str | None = None, extra: str = "") -> str:
    """A Backend on one loopback endpoint; its host defaults to `<name without -api>.local`, its audience to
    `https://<host>`."""
    host = host or f"{name.removesuffix('-api')}.local"
    audience = audience or f"https://{host}"
    return (
        f"kind: Backend\nname: {name}\nhosts: [{host}]\naudience: {audience}\n"
        f"endpoints: [{{address: 127.0.0.1, port: {port}}}]\n{_lines(extra)}"
    )


def role(name: str, backend: str, methods: Iterable[str] = ("GET",), paths: Iterable[str] = ()) -> str:
    rule = f"methods: [{', '.join(methods)}]"
    if paths := list(paths):
        rule += f", paths: [{', '.join(json.dumps(p) for p in paths)}]"
    return f"kind: Role\nname: {name}\nbackend: {backend}\nrules: [{{{rule}}}]\n"


def binding(name: str, roles: Iterable[str], *subjects: str, extra: str = "") -> str:
    """A Binding; each subject is one YAML flow mapping (`{project: 42, ref_protected: true}`), `extra` more
    keys (a TTL, a mode, an issuer)."""
    listed = "".join(f"  - {subject}\n" for subject in subjects)
    return f"kind: Binding\nname: {name}\nroles: [{', '.join(roles)}]\n{_lines(extra)}subjects:\n{listed}"


def gateway(port: int, backends: Iterable[str], *, name: str = "ci-gateway", access_log: object = "/dev/null") -> str:
    return (
        f"kind: Gateway\nname: {name}\nlisten: {{address: 127.0.0.1, port: {port}}}\n"
        f"backends: [{', '.join(backends)}]\naccess_log: {access_log}\n"
    )


def _lines(extra: str) -> str:
    extra = extra.strip("\n")
    return f"{extra}\n" if extra else ""


# Two GitLab instances watched through their APIs (the tokens' env names only: nothing is read from them here).
MAIN_GITLAB = issuer("https://gitlab.example.com", name="main", extra="api: {token_env: GITLAB_TOKEN}")
OTHER_GITLAB = issuer("https://gitlab.other.example", name="other", extra="api: {token_env: OTHER_TOKEN}")
TWO_GITLABS = documents(MAIN_GITLAB, OTHER_GITLAB)


Edit = Callable[[Path], None]  # a change to a copied policy directory


def replace_in(name: str, old: str, new: str) -> Edit:
    """An edit replacing the first `old` in the file `name` by `new`; `old` must be there (a stale edit fails)."""

    def edit(root: Path) -> None:
        path = root / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, 1))

    return edit
