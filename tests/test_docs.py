"""The metrics reference names every metric the control plane exports, so an operator can trust it."""

from __future__ import annotations

import re
from pathlib import Path

import controlplane.cli.serve  # noqa: F401  (imports every module that registers a metric)
from controlplane.telemetry.metrics import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def _documented() -> str:
    return (ROOT / "docs" / "metrics.md").read_text()


def _exported() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        if metric.name.startswith("controlplane_"):
            names.add(metric.name + ("_total" if metric.type == "counter" else ""))
    return names


def test_every_exported_metric_is_in_the_reference() -> None:
    text = _documented()
    documented = set(re.findall(r"controlplane_[a-z0-9_]+", text))
    # "`controlplane_gitlab_rate_limit_waits_total`, `…_wait_seconds_total`" abbreviates a sibling's prefix.
    for short in re.findall(r"`…(_[a-z0-9_]+)`", text):
        documented |= {name.rsplit("_", 2)[0] + short for name in documented}
    missing = sorted(n for n in _exported() if n not in documented)
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def test_the_complete_policy_example_is_a_valid_policy() -> None:
    """docs/policy-example.md is what a reader copies: every file of it, as printed, must load."""
    from controlplane.model.loader import parse_policy

    text = (ROOT / "docs" / "policy-example.md").read_text()
    files = dict(re.findall(r"^`([\w/.-]+\.yaml)`\n```yaml\n(.*?)```", text, flags=re.MULTILINE | re.DOTALL))
    assert {"issuers.yaml", "inventory/gitlab.yaml", "roles.yaml", "bindings.yaml", "gateway.yaml"} <= set(files)
    policy = parse_policy(files)
    assert {b.name for b in policy.bindings} == {"deployer-deploys", "platform-reads", "sre-humans"}


# --- links: every relative link in the README and docs/ leads somewhere -------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = "".join(c for c in text if c.isalnum() or c in " _-")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _FENCE.sub("", path.read_text()), flags=re.MULTILINE):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", path.read_text()))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def _markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_slug_rule_matches_githubs_for_our_kinds_of_heading() -> None:
    assert _slug("kind: Issuer — a trusted token issuer") == "kind-issuer--a-trusted-token-issuer"
    assert _slug("Signing keys in PostgreSQL") == "signing-keys-in-postgresql"
    assert _slug("`controlplane_gitlab_inventory_stale`") == "controlplane_gitlab_inventory_stale"
    assert _slug("Replicas: identical versions and failover") == "replicas-identical-versions-and-failover"


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    """A page moved or a heading renamed must not leave a reader at a dead link."""
    broken = []
    for page in _markdown_pages():
        for target in _relative_links(page):
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_finds_a_dead_link_and_a_dead_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [gone](b.md) [no](#nothing) `[code](x.md)`\n")
    links = _relative_links(tmp_path / "a.md")
    assert links == ["#title", "b.md", "#nothing"]
    assert _anchors(tmp_path / "a.md") == {"title"}


# --- the repository cites only itself ---------------------------------------------------------------------------------

# Documents the team keeps outside the repository, and the ids of the cards in them. Spelled in pieces so that this
# file does not name them itself. Facts taken from them are written in docs/ (envoy-filters.md, xds-protocol.md,
# gitlab-behaviour.md), which is what code and docs cite.
_OUTSIDE = re.compile(
    "|".join(
        [
            re.escape("xds-protocol-" + "observed"),
            re.escape("envoy-1.40-" + "verified"),
            re.escape("gitlab-" + "identity.md"),
            re.escape("DESIGN" + ".md"),
            re.escape("../" + "shared/"),
            re.escape("shared/" + "reference"),
        ]
    )
)
# A card id (the letter G and one or two digits) in prose or code. Only looked for in files people write: in
# generated data (snapshots, keys) such a string can occur by chance.
_CARD = re.compile(r"\b" + "G" + r"[0-9]{1,2}\b")
_PROSE = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh", ".yml"}


def _repository_files() -> list[Path]:
    """Every file of the repository outside .git: tracked, or new and not ignored (what a commit would hold)."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_nothing_in_the_repository_cites_documents_outside_it() -> None:
    offenders = []
    for path in _repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files cite nothing
        prose = path.suffix in _PROSE or path.name in {"Makefile", "Dockerfile", "run"}
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line) or (prose and _CARD.search(line)):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "cite the docs/ page instead:\n" + "\n".join(offenders)


def test_the_outside_citation_check_recognises_each_form() -> None:
    card = "G" + "11"
    for cited in (f"see {card}", f"({card})"):
        assert _CARD.search(cited), cited
    for cited in ("xds-protocol-" + "observed.md §7", "../" + "shared/DESIGN" + ".md"):
        assert _OUTSIDE.search(cited), cited
    for ours in ("4 GiB", "GET /status", "docs/envoy-filters.md#issuer-keys", "F12"):
        assert not _OUTSIDE.search(ours) and not _CARD.search(ours), ours
