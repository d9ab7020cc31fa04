"""An inventory file (`groups:` and `projects:` of a GitLab instance, written offline) read into an `Inventory`.

Such a file is named by an Issuer's `inventory:` and read instead of as policy documents. Its ids, paths and
parent links must agree, or a group pin would silently cover the wrong projects.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.model import scalars
from controlplane.model.errors import quoted
from controlplane.model.fields import Ctx, Fields, list_of, need, record, report_duplicates
from controlplane.model.inventory import DEFAULT_ARCHIVED, Group, Inventory, Project
from controlplane.model.yaml_source import YNode, YSeq


def _group_fields(f: Fields) -> Group:
    group_id, path = f.required("id", scalars.positive), f.required("path", scalars.group_path)
    return Group(need(group_id), need(path), f.maybe("parent_id", scalars.positive))


def _project_fields(f: Fields) -> Project:
    project_id, path = f.required("id", scalars.positive), f.required("path", scalars.project_path)
    namespace_id = f.required("namespace_id", scalars.positive)
    archived = f.optional("archived", scalars.boolean, DEFAULT_ARCHIVED)
    return Project(need(project_id), need(path), need(namespace_id), need(archived))


_group = record(_group_fields, ("id", "path", "parent_id"))
_project = record(_project_fields, ("id", "path", "namespace_id", "archived"))


def read_inventory(ctx: Ctx, documents: tuple[YNode, ...]) -> Inventory | None:
    """One document `{groups: [...], projects: [...]}` whose ids and parent links are consistent."""
    for extra in documents[1:]:
        ctx.error(extra.line, "", "an inventory file holds one document")
    if not documents:
        return Inventory()

    def build(f: Fields) -> Inventory:
        maybe_groups = f.optional_tuple("groups", list_of(_group, non_empty=False))
        maybe_projects = f.optional_tuple("projects", list_of(_project, non_empty=False))
        groups, projects = need(maybe_groups), need(maybe_projects)
        _check_inventory(f, groups, projects)
        by_id = sorted(projects, key=lambda p: p.id), sorted(groups, key=lambda g: g.id)
        return Inventory(tuple(by_id[0]), tuple(by_id[1]))

    return record(build, ("groups", "projects"))(ctx, documents[0], "")


def _items(f: Fields, key: str) -> tuple[YNode, ...]:
    node = f.node.get(key)
    return node.items if isinstance(node, YSeq) else ()


def _check_inventory(f: Fields, groups: tuple[Group, ...], projects: tuple[Project, ...]) -> None:
    """Ids unique, paths unique (groups and projects share GitLab's namespace), links consistent."""
    located = [
        (f"groups[{i}]", n.line, g.id, g.path, g.parent_id, "parent_id")
        for i, (g, n) in enumerate(zip(groups, _items(f, "groups"), strict=True))
    ] + [
        (f"projects[{i}]", n.line, p.id, p.path, p.namespace_id, "namespace_id")
        for i, (p, n) in enumerate(zip(projects, _items(f, "projects"), strict=True))
    ]
    for prefix in ("groups", "projects"):
        ids = [(i, line, f"{at}.id") for at, line, i, *_ in located if at.startswith(prefix)]
        report_duplicates(f.ctx, ids)
    report_duplicates(f.ctx, [(path, line, f"{at}.path") for at, line, _, path, *_ in located])
    by_id = {g.id: g for g in groups}
    for at, line, _, path, parent_id, key in located:
        problem = _parent_problem(path, parent_id, by_id, key)
        if problem:
            f.ctx.error(line, f"{at}.{problem[0]}", problem[1])


def _parent_problem(path: str, parent_id: int | None, groups: Mapping[int, Group], key: str) -> tuple[str, str] | None:
    """Paths must agree with parent links, or a group pin would silently cover the wrong projects."""
    parent_path = path.rpartition("/")[0]
    if parent_id is None:
        return ("parent_id", f"missing: {quoted(path)} is a subgroup of {quoted(parent_path)}") if parent_path else None
    parent = groups.get(parent_id)
    if parent is None:
        return (key, f"no group with id {parent_id} in this inventory")
    if parent.path != parent_path:
        return ("path", f"{quoted(path)} is not directly under group {parent_id} ({quoted(parent.path)})")
    return None
