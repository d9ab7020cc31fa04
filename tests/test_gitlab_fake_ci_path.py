"""The fake GitLab's `ci_config_path` (Settings > CI/CD > CI/CD configuration file), as GitLab's project API
returns it: null when the project uses `.gitlab-ci.yml`, else the path as set (`file@group/project` included)."""

from __future__ import annotations

import gitlab

from tests.support.fake_gitlab import FakeGitLab


def test_ci_config_path_in_the_project_api() -> None:
    with FakeGitLab() as fake:
        fake.add_project("acme/a", id=1)
        fake.add_project("acme/b", id=2, ci_config_path="ci/pipeline.yml")
        gl = gitlab.Gitlab(fake.api_url, private_token=fake.api_token)
        assert gl.projects.get(1).attributes["ci_config_path"] is None
        assert gl.projects.get(2).attributes["ci_config_path"] == "ci/pipeline.yml"
