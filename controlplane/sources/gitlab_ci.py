"""A project's CI configuration and ref protections, read through the GitLab API for `controlplane suggest`.

Read-only and bounded: a `read_api` token (GitLabSource: rate bound, retries, errors safe to log), raw files of
the default branch streamed and cut at `max_file_bytes`, and what GitLab protects now (`GitLabSource`'s refs:
branches carry GitLab's own verdict, tags are matched against protected tags). Parsing is the pure
controlplane.assistant.ci_config's, which is handed `CiProject.read`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gitlab.exceptions import GitlabGetError

from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.policy_dir import READ_CHUNK

MAX_CI_FILE_BYTES = 1024 * 1024


@dataclass
class CiProject:
    """One project's default branch, for reading files at it; `protected` maps each ref GitLab has to its
    protection now."""

    source: GitLabSource
    id: int
    path: str
    default_branch: str | None
    protected: dict[str, bool] = field(default_factory=dict)
    max_file_bytes: int = MAX_CI_FILE_BYTES
    ci_config_path: str | None = None  # the project's own CI file setting; None or "": `.gitlab-ci.yml`

    def read(self, path: str) -> str | None:
        """The file's text at the default branch; None when it does not exist (or the repository is empty).
        A file past the bound is returned cut one byte past it, so the parser reports it as too large."""
        if self.default_branch is None:
            return None
        project = self.source.gl.projects.get(self.id, lazy=True)
        content = bytearray()
        with self.source.errors_as_unavailable():
            try:
                chunks = project.files.raw(
                    file_path=path, ref=self.default_branch, streamed=True, iterator=True, chunk_size=READ_CHUNK
                )
                for chunk in chunks:
                    content += chunk
                    if len(content) > self.max_file_bytes:
                        break
            except GitlabGetError as exc:
                # 404: no such file. 400/403: a path GitLab refuses, or a repository this token may not read. One
                # project's file is no reason to fail the whole run: it is reported not read, and the
                # configuration counts as incomplete (nothing is pinned from it).
                if exc.response_code in (400, 403, 404):
                    return None
                raise
        return bytes(content[: self.max_file_bytes + 1]).decode("utf-8", errors="replace")


def ci_project(source: GitLabSource, project: str | int) -> CiProject | None:
    """The project as GitLab has it now (id, path, default branch, refs and their protection); None if absent."""
    found = source.fetch_project(project)
    if found is None:
        return None
    # A branch and a tag may share a name, and the trail keeps the ref's name only: protected only if both are
    # (a protected tag `v1` must not make the unprotected branch `v1`'s jobs look protected, to be pinned out).
    protected: dict[str, bool] = {}
    for ref in found.refs or ():
        protected[ref.name] = protected.get(ref.name, True) and ref.protected
    with source.errors_as_unavailable():  # the inventory's Project does not carry the CI file setting
        setting = source.gl.projects.get(found.id).attributes.get("ci_config_path")
    path = setting if isinstance(setting, str) and setting else None
    return CiProject(source, found.id, found.path, found.default_branch, protected, ci_config_path=path)
