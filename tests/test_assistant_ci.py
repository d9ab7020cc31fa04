"""The CI-configuration reader of `controlplane suggest` on real-world shaped `.gitlab-ci.yml` files: jobs and their
ID-token audiences, environments, the refs and pipeline sources their rules allow, local includes (nesting,
cycles, bounds), `extends`, and what it does not understand (reported, taken as no constraint, never guessed)."""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.assistant.ci_config import MAX_FILES, CiConfig, condition_cases, load_ci_config

DEPLOY = """
stages: [build, deploy]
variables:
  GIT_DEPTH: "1"
default:
  image: alpine:3.20
.deploy-template:
  stage: deploy
  id_tokens:
    DEPLOY_TOKEN:
      aud: https://deploy.local
  rules:
    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH && $CI_PIPELINE_SOURCE == "push"
    - if: $CI_COMMIT_TAG && $CI_COMMIT_REF_PROTECTED == "true"
      when: manual
build:
  stage: build
  script: [make]
deploy-prod:
  extends: .deploy-template
  environment:
    name: production
    deployment_tier: production
  script: [./deploy.sh]
read-reports:
  id_tokens:
    REPORTS:
      aud: [https://reports.local, https://other.local]
  environment: review/$CI_COMMIT_REF_SLUG
  rules:
    - if: $CI_PIPELINE_SOURCE == "merge_request_event"
      when: never
    - if: ($CI_COMMIT_BRANCH == "main" || $CI_COMMIT_BRANCH =~ /^release\\/.*$/) && $CI_COMMIT_REF_PROTECTED == "true"
legacy:
  only: [main, tags, schedules]
  except: [/^wip/]
  id_tokens:
    T: {aud: https://reports.local}
  script: [true]
"""


def _load(files: Mapping[str, str], default_branch: str | None = "main") -> CiConfig:
    return load_ci_config("acme/app", files.get, default_branch=default_branch)


def test_jobs_audiences_and_environments() -> None:
    config = _load({".gitlab-ci.yml": DEPLOY})
    assert [j.name for j in config.jobs] == ["build", "deploy-prod", "legacy", "read-reports"]
    jobs = {j.name: j for j in config.jobs}
    assert jobs["build"].id_tokens == ()
    assert jobs["deploy-prod"].id_tokens == (("DEPLOY_TOKEN", ("https://deploy.local",)),)
    assert (jobs["deploy-prod"].environment, jobs["deploy-prod"].tier) == ("production", "production")
    assert jobs["read-reports"].audiences == {"https://reports.local", "https://other.local"}
    assert jobs["read-reports"].environment == "review/$CI_COMMIT_REF_SLUG"
    assert any("dynamic" in u for u in jobs["read-reports"].unknown)
    assert [j.name for j in config.jobs_for("https://reports.local")] == ["legacy", "read-reports"]


def test_rules_refs_sources_and_protection() -> None:
    jobs = {j.name: j for j in _load({".gitlab-ci.yml": DEPLOY}).jobs}
    deploy = jobs["deploy-prod"]
    # default branch on push, or a protected tag (any name): refs are not a finite set
    assert deploy.refs is None
    assert [(c.refs, c.ref_type, c.protected, c.sources) for c in deploy.cases] == [
        (frozenset({"main"}), "branch", None, frozenset({"push"})),
        (None, "tag", True, None),
    ]
    assert deploy.sources is None and not deploy.always_protected
    reports = jobs["read-reports"]
    # the regex branch is not understood: that case is "any branch", protected; never a guessed name
    assert reports.always_protected and reports.refs is None
    assert any("=~" in u for u in reports.unknown)
    assert any("when: never" in u for u in reports.unknown)
    legacy = jobs["legacy"]
    assert [(c.refs, c.ref_type, c.sources) for c in legacy.cases] == [
        (frozenset({"main"}), None, None),
        (None, "tag", None),
        (None, None, frozenset({"schedule"})),
    ]
    assert "except: not applied" in legacy.unknown


def test_condition_forms() -> None:
    unknown: list[str] = []
    cases = condition_cases('$CI_COMMIT_REF_NAME == "v1" || $CI_COMMIT_REF_NAME == "v2"', "main", unknown)
    assert sorted(next(iter(c.refs or ())) for c in cases) == ["v1", "v2"] and not unknown
    # a contradiction runs nowhere
    assert condition_cases('$CI_COMMIT_BRANCH == "a" && $CI_COMMIT_BRANCH == "b"', "main", unknown) == []
    # other variables narrow further: taken as no constraint (a superset), and said so
    (case,) = condition_cases('$DEPLOY == "yes" && $CI_PIPELINE_SOURCE == "web"', "main", unknown)
    assert case.sources == {"web"} and any("$DEPLOY" in u for u in unknown)
    garbled: list[str] = []
    (case,) = condition_cases("$CI_COMMIT_BRANCH == (", "main", garbled)
    assert case.refs is None and garbled and "not parsed" in garbled[0]
    # $CI_DEFAULT_BRANCH with no default branch known is not a name
    nameless: list[str] = []
    (case,) = condition_cases("$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH", None, nameless)
    assert case.refs is None and nameless


def test_local_includes_merge_nest_and_stop_at_cycles() -> None:
    files = {
        ".gitlab-ci.yml": "include:\n  - local: /ci/deploy.yml\n  - ci/common.yml\n  - project: other/x\n"
        "    file: a.yml\n  - remote: https://example.com/x.yml\nextra:\n  script: [x]\n",
        "ci/deploy.yml": "include: {local: ci/nested.yml}\ndeploy:\n  id_tokens: {T: {aud: https://deploy.local}}\n",
        "ci/nested.yml": "include: ci/deploy.yml\n.base:\n  environment: staging\n",
        "ci/common.yml": 'deploy:\n  extends: .base\n  rules:\n    - if: $CI_COMMIT_BRANCH == "main"\n',
    }
    config = _load(files)
    assert config.files == (".gitlab-ci.yml", "ci/deploy.yml", "ci/nested.yml", "ci/common.yml")
    jobs = {j.name: j for j in config.jobs}
    deploy = jobs["deploy"]
    assert deploy.audiences == {"https://deploy.local"}
    assert deploy.environment == "staging" and deploy.refs == {"main"}
    assert any("cycle" in n for n in config.notes)
    assert any("include project: not read" in n for n in config.notes)
    assert any("include remote: not read" in n for n in config.notes)


def test_bounds_missing_files_and_bad_yaml() -> None:
    chain = {".gitlab-ci.yml": "include: f0.yml\n"}
    chain.update({f"f{i}.yml": f"include: f{i + 1}.yml\n" for i in range(MAX_FILES + 5)})
    config = _load(chain)
    assert len(config.files) <= MAX_FILES + 1
    assert any("deeper" in n or "more than" in n for n in config.notes)
    assert _load({}).notes == (".gitlab-ci.yml: not found at the default branch",)
    broken = _load({".gitlab-ci.yml": "job: [unclosed\n"})
    assert broken.jobs == () and "not valid YAML" in broken.notes[0]
    tagged = _load({".gitlab-ci.yml": ".r:\n  rules: [{if: $X}]\njob:\n  rules: !reference [.r, rules]\n"})
    (job,) = tagged.jobs
    assert job.refs is None and any("!reference" in u for u in job.unknown)


def test_workflow_rules_and_default_id_tokens() -> None:
    text = """
workflow:
  rules:
    - if: $CI_COMMIT_REF_PROTECTED == "true"
default:
  id_tokens:
    ID: {aud: https://reports.local}
a:
  script: [x]
b:
  inherit: {default: false}
  script: [x]
c:
  id_tokens: {OWN: {aud: https://deploy.local}}
  rules:
    - if: $CI_COMMIT_BRANCH == "main"
"""
    jobs = {j.name: j for j in _load({".gitlab-ci.yml": text}).jobs}
    assert jobs["a"].audiences == {"https://reports.local"} and jobs["a"].always_protected
    assert jobs["b"].audiences == frozenset()
    assert jobs["c"].audiences == {"https://deploy.local"}
    assert jobs["c"].refs == {"main"} and jobs["c"].always_protected
