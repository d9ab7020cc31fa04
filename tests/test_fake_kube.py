"""The fake Kubernetes API server is faithful: proven through the real ``kubernetes`` client, as a cluster is used.

The EndpointSlice discovery is only as well tested as this fake is true: every behaviour the discovery relies on
(lists and their resourceVersion, paging, chunked watches, bookmarks, 410 Gone, timeouts, auth, TLS) is checked
here through ``DiscoveryV1Api`` and ``kubernetes.watch.Watch``, and every object against the API's strict
OpenAPI schema (``kubernetes-validate``) and the client's models. docs/kubernetes-endpoints.md ("The fake API
server") says what the fake does where the documented behaviour is subtle.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes_validate
import pytest
import urllib3
from kubernetes.client import DiscoveryV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from tests.support.certs import make_pki
from tests.support.fake_kube import API_VERSION, KIND, SERVICE_NAME_LABEL, FakeKube, endpoint, endpoint_slice
from tests.support.ports import poll_until

WEB = f"{SERVICE_NAME_LABEL}=web"
Event = dict[str, Any]
READ_TIMEOUT = 10  # seconds a test's watch waits for its next event


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def api(kube: FakeKube) -> DiscoveryV1Api:
    return DiscoveryV1Api(kube.api_client())


def web_slice(*addresses: str, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return endpoint_slice("web", [endpoint(a, pod=f"web-{i}") for i, a in enumerate(addresses)], name=name, **kwargs)


def watching(watch: Watch, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Event]:
    """``watch.stream``, with a read timeout so a test whose event never comes fails instead of hanging."""
    return watch.stream(func, *args, _request_timeout=READ_TIMEOUT, **kwargs)  # type: ignore[no-any-return]


def collect(stream: Iterator[Event], count: int, watch: Watch) -> list[Event]:
    """The first ``count`` events of a watch, then stop it (the client closes the stream)."""
    out: list[Event] = []
    for event in stream:
        out.append(event)
        if len(out) == count:
            watch.stop()
    return out


def when_watching(kube: FakeKube, action: Callable[[], object], watches: int = 1) -> threading.Thread:
    """Run ``action`` once ``watches`` watches are open on the fake (the test thread is inside the client's
    blocking stream meanwhile)."""

    def run() -> None:
        poll_until(lambda: kube.open_watches >= watches, timeout=10, message="watch open")
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def normalized(value: Any) -> Any:
    """The JSON the server sent, with timestamps as the client re-serializes them (datetimes)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, str) and len(value) == 20 and value.endswith("Z") and value[10] == "T":
        return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).isoformat()
    return value


def raw_list(api: DiscoveryV1Api, namespace: str = "default", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    resp = api.list_namespaced_endpoint_slice(
        namespace, _preload_content=False, _request_timeout=READ_TIMEOUT, **kwargs
    )
    try:
        return resp.status, json.loads(resp.data)
    finally:
        resp.release_conn()


# --- objects


def test_objects_are_valid_endpoint_slices_and_deserialize_into_the_client_models_without_unknown_fields(
    kube: FakeKube, api: DiscoveryV1Api
) -> None:
    kube.create(
        endpoint_slice(
            "web",
            [
                endpoint("10.0.0.1", pod="web-a", zone="zone-a", hostname="web-a"),
                endpoint("10.0.0.2", ready=False, serving=True, terminating=True, pod="web-b"),
                endpoint("10.0.0.3", ready=False, pod="web-c", node=None),
            ],
            ports=[("http", 8080), ("grpc", 9090), (None, 7000)],
        )
    )
    kube.create(endpoint_slice("web", [endpoint("fd00::1")], address_type="IPv6"))
    kube.create(endpoint_slice("web", [endpoint("db.example.com", node=None)], address_type="FQDN"))
    status, body = raw_list(api, label_selector=WEB)
    assert status == 200 and body["kind"] == "EndpointSliceList" and body["apiVersion"] == API_VERSION
    assert {item["addressType"] for item in body["items"]} == {"IPv4", "IPv6", "FQDN"}

    typed = api.list_namespaced_endpoint_slice("default", label_selector=WEB)
    serialized = kube.api_client().sanitize_for_serialization(typed)
    assert serialized == normalized(body), "a field the client's models do not know was sent (or one was lost)"
    for item in body["items"]:
        # List items carry no kind/apiVersion (the list does); the schema wants them on an object alone.
        assert "kind" not in item and "apiVersion" not in item
        kubernetes_validate.validate({"kind": KIND, "apiVersion": API_VERSION, **item}, "1.37", strict=True)
        assert item["metadata"]["labels"][SERVICE_NAME_LABEL] == "web"
        assert item["metadata"]["ownerReferences"][0]["kind"] == "Service"
    (ipv4,) = (item for item in body["items"] if item["addressType"] == "IPv4")
    conditions = [e["conditions"] for e in ipv4["endpoints"]]
    assert conditions == [
        {"ready": True, "serving": True, "terminating": False},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": False, "serving": False, "terminating": False},
    ]


def test_create_replace_delete_keep_metadata_like_the_api_server(kube: FakeKube, api: DiscoveryV1Api) -> None:
    created = kube.create(web_slice("10.0.0.1"))
    name = created["metadata"]["name"]
    assert name.startswith("web-") and len(name) == len("web-") + 5
    relabelled = json.loads(json.dumps(created))
    relabelled["metadata"]["labels"]["extra"] = "yes"
    same_spec = kube.replace(relabelled)
    assert same_spec["metadata"]["generation"] == 1, "a metadata-only change does not bump the generation"
    moved = web_slice("10.0.0.9", name=name)
    replaced = kube.replace(moved)
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["metadata"]["generation"] == 2
    assert int(replaced["metadata"]["resourceVersion"]) > int(same_spec["metadata"]["resourceVersion"])
    got = api.read_namespaced_endpoint_slice(name, "default")
    assert got.endpoints[0].addresses == ["10.0.0.9"] and got.kind == KIND
    with pytest.raises(KeyError):
        kube.create(web_slice("10.0.0.1", name=name))
    kube.delete("default", name)
    with pytest.raises(ApiException) as err:
        api.read_namespaced_endpoint_slice(name, "default")
    assert err.value.status == 404
    with pytest.raises(KeyError):
        kube.delete("default", name)


def test_it_refuses_what_the_api_server_refuses(kube: FakeKube) -> None:
    def refused(obj: dict[str, Any]) -> str:
        with pytest.raises(ValueError, match="EndpointSlice is invalid") as err:
            kube.create(obj)
        return str(err.value)

    assert "not an IPv4 address" in refused(web_slice("fd00::1"))
    assert "not an IPv6 address" in refused(web_slice("10.0.0.1", address_type="IPv6"))
    assert "not an IPv4 address" in refused(web_slice("10.0.0.300"))
    assert "'bogus' was unexpected" in refused(endpoint_slice("web", [{**endpoint("10.0.0.1"), "bogus": 1}]))
    assert "Duplicate" in refused(endpoint_slice("web", [endpoint("10.0.0.1")], ports=[("http", 80), ("http", 81)]))
    assert "not a DNS label" in refused(endpoint_slice("web", [endpoint("10.0.0.1")], ports=[("HTTP", 80)]))
    assert "at most 1000" in refused(web_slice(*(f"10.0.{i // 250}.{i % 250}" for i in range(1001))))
    assert "between 1 and 100" in refused(endpoint_slice("web", [endpoint([])]))
    # Since CVE-2021-25737 (EndpointSlices could point kube-proxy at a node's own host) the server refuses these:
    assert "loopback" in refused(web_slice("127.0.0.1"))
    assert "loopback" in refused(web_slice("::1", address_type="IPv6"))
    assert "loopback" in refused(web_slice("::ffff:127.0.0.1", address_type="IPv6"))
    assert "unspecified" in refused(web_slice("0.0.0.0"))
    assert "link-local" in refused(web_slice("169.254.169.254"))
    assert "link-local multicast" in refused(web_slice("224.0.0.5"))
    assert kube.slices() == [] and kube.resource_version == "1000", "nothing refused was stored"
    kube.validate = False  # a test that wants to feed the discovery what no real server would
    assert kube.create(web_slice("fd00::1"))["endpoints"][0]["addresses"] == ["fd00::1"]
    assert kube.create(web_slice("127.0.0.1", name="local"))["endpoints"][0]["addresses"] == ["127.0.0.1"]


def test_it_stores_special_addresses_the_api_server_does_not_refuse(kube: FakeKube) -> None:
    """What the control plane must refuse on its own: the API server stores these."""
    for i, address in enumerate(("239.1.2.3", "255.255.255.255", "100.100.100.200")):
        kube.create(web_slice(address, name=f"web-{i}"))
    kube.create(web_slice("fd00:ec2::254", name="web-v6", address_type="IPv6"))
    assert len(kube.slices()) == 4


# --- lists


def test_label_selectors_and_namespaces(kube: FakeKube, api: DiscoveryV1Api) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a", labels={"tier": "front"}))
    kube.create(web_slice("10.0.0.2", name="web-b", labels={"tier": "back"}))
    kube.create(endpoint_slice("db", [endpoint("10.0.1.1")], name="db-a"))
    kube.create(web_slice("10.0.2.1", name="web-a", namespace="other"))

    def names(selector: str, namespace: str | None = "default") -> list[str]:
        if namespace is None:
            result = api.list_endpoint_slice_for_all_namespaces(label_selector=selector)
            return [f"{i.metadata.namespace}/{i.metadata.name}" for i in result.items]
        return [i.metadata.name for i in api.list_namespaced_endpoint_slice(namespace, label_selector=selector).items]

    assert names(WEB) == ["web-a", "web-b"]
    assert names(f"{WEB},tier=front") == ["web-a"]
    assert names(f"{WEB},tier!=front") == ["web-b"]
    assert names("tier in (front,back),tier notin (back)") == ["web-a"]
    assert names("tier") == ["web-a", "web-b"] and names("!tier") == ["db-a"]
    assert names(WEB, namespace="other") == ["web-a"]
    assert names(WEB, namespace=None) == ["default/web-a", "default/web-b", "other/web-a"]
    assert names(f"{SERVICE_NAME_LABEL}==db") == ["db-a"]
    by_name = api.list_namespaced_endpoint_slice("default", field_selector="metadata.name=web-b")
    assert [i.metadata.name for i in by_name.items] == ["web-b"]
    for bad in ("tier in front", "=x", "a=b=c"):
        with pytest.raises(ApiException) as err:
            api.list_namespaced_endpoint_slice("default", label_selector=bad)
        assert err.value.status == 400, bad
    with pytest.raises(ApiException) as err:
        api.list_namespaced_endpoint_slice("default", field_selector="spec.nodeName=x")
    assert err.value.status == 400


def test_list_resource_version_is_the_global_revision_at_the_list(kube: FakeKube, api: DiscoveryV1Api) -> None:
    empty = api.list_namespaced_endpoint_slice("default")
    assert empty.items == [] and empty.metadata.resource_version == kube.resource_version
    first = kube.create(web_slice("10.0.0.1"))
    kube.create(endpoint_slice("db", [endpoint("10.0.1.1")], namespace="other"))
    listed = api.list_namespaced_endpoint_slice("default")
    # The collection's version is the store's, even when the newest write is in another namespace.
    assert listed.metadata.resource_version == kube.resource_version
    assert int(listed.metadata.resource_version) > int(first["metadata"]["resourceVersion"])
    assert listed.items[0].metadata.resource_version == first["metadata"]["resourceVersion"]


def test_paging_with_limit_and_continue_is_a_consistent_snapshot(kube: FakeKube, api: DiscoveryV1Api) -> None:
    for i in range(5):
        kube.create(web_slice(f"10.0.0.{i}", name=f"web-{i}"))
    first = api.list_namespaced_endpoint_slice("default", label_selector=WEB, limit=2)
    assert [i.metadata.name for i in first.items] == ["web-0", "web-1"]
    assert first.metadata._continue and first.metadata.remaining_item_count is None  # a selector: no count
    kube.delete("default", "web-3")  # after the first page: the pages still show the first page's snapshot
    kube.create(web_slice("10.0.0.9", name="web-5"))
    second = api.list_namespaced_endpoint_slice(
        "default", label_selector=WEB, limit=2, _continue=first.metadata._continue
    )
    third = api.list_namespaced_endpoint_slice(
        "default", label_selector=WEB, limit=2, _continue=second.metadata._continue
    )
    assert [i.metadata.name for i in second.items + third.items] == ["web-2", "web-3", "web-4"]
    assert not third.metadata._continue
    assert first.metadata.resource_version == second.metadata.resource_version == third.metadata.resource_version
    unselected = api.list_namespaced_endpoint_slice("default", limit=4)
    assert unselected.metadata.remaining_item_count == 1
    with pytest.raises(ApiException) as err:
        api.list_namespaced_endpoint_slice("default", limit=2, _continue="not-a-token")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        api.list_namespaced_endpoint_slice("default", _continue=first.metadata._continue, resource_version="1")
    assert err.value.status == 400


def test_an_expired_continue_token_is_410_with_a_token_for_an_inconsistent_rest(
    kube: FakeKube, api: DiscoveryV1Api
) -> None:
    for i in range(3):
        kube.create(web_slice(f"10.0.0.{i}", name=f"web-{i}"))
    first = api.list_namespaced_endpoint_slice("default", limit=1)
    kube.create(web_slice("10.0.0.9", name="web-9"))
    kube.compact()
    with pytest.raises(ApiException) as err:
        api.list_namespaced_endpoint_slice("default", limit=1, _continue=first.metadata._continue)
    assert err.value.status == 410
    status = json.loads(err.value.body)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "Expired", 410)
    rest = api.list_namespaced_endpoint_slice("default", _continue=status["metadata"]["continue"])
    assert [i.metadata.name for i in rest.items] == ["web-1", "web-2", "web-9"], "the rest, from the latest state"


def test_list_resource_version_match_semantics(kube: FakeKube, api: DiscoveryV1Api) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a"))
    before = kube.resource_version
    kube.create(web_slice("10.0.0.2", name="web-b"))

    def names(**kwargs: Any) -> list[str]:
        return [i.metadata.name for i in api.list_namespaced_endpoint_slice("default", **kwargs).items]

    assert names(resource_version=before, resource_version_match="Exact") == ["web-a"]
    assert names(resource_version=before, limit=10) == ["web-a"], "a version with a limit is Exact (legacy)"
    assert names(resource_version=before) == ["web-a", "web-b"], "a version alone is NotOlderThan: the latest"
    assert names(resource_version=before, resource_version_match="NotOlderThan") == ["web-a", "web-b"]
    assert names(resource_version="0") == ["web-a", "web-b"], "0 is any version: this fake serves the latest"
    invalid: list[dict[str, Any]] = [
        {"resource_version_match": "Exact"},
        {"resource_version": "0", "resource_version_match": "Exact"},
        {"resource_version": "x"},
        {"resource_version": before, "resource_version_match": "Newest"},
    ]
    for bad in invalid:
        with pytest.raises(ApiException) as err:
            names(**bad)
        assert err.value.status == 400, bad
    kube.compact()
    with pytest.raises(ApiException) as err:
        names(resource_version=before, resource_version_match="Exact")
    assert err.value.status == 410 and json.loads(err.value.body)["reason"] == "Expired"
    kube.too_large_wait = 0.05
    with pytest.raises(ApiException) as err:
        names(resource_version=str(int(kube.resource_version) + 10))
    assert err.value.status == 504 and "Too large resource version" in json.loads(err.value.body)["message"]


# --- watches


def test_watch_yields_added_modified_deleted_with_increasing_versions(kube: FakeKube, api: DiscoveryV1Api) -> None:
    start = api.list_namespaced_endpoint_slice("default", label_selector=WEB).metadata.resource_version

    def changes() -> None:
        kube.create(web_slice("10.0.0.1", name="web-a"))
        kube.replace(web_slice("10.0.0.2", name="web-a"))
        kube.create(endpoint_slice("db", [endpoint("10.0.1.1")], name="db-a"))  # not selected: never seen
        kube.delete("default", "web-a")

    when_watching(kube, changes)
    watch = Watch()
    events = collect(
        watching(watch, api.list_namespaced_endpoint_slice, "default", label_selector=WEB, resource_version=start),
        3,
        watch,
    )
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert all(isinstance(e["object"], kubernetes.client.V1EndpointSlice) for e in events)
    assert [e["object"].endpoints[0].addresses for e in events] == [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.2"]]
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 3 and versions[0] > int(start)
    assert versions[-1] == int(kube.resource_version), "DELETED carries the deletion's version"
    assert watch.resource_version == str(versions[-1])
    for event in events:
        assert event["raw_object"]["kind"] == KIND and event["raw_object"]["apiVersion"] == API_VERSION
        kubernetes_validate.validate(event["raw_object"], "1.37", strict=True)


def test_a_watch_from_a_past_version_replays_the_changes_since(kube: FakeKube, api: DiscoveryV1Api) -> None:
    start = kube.resource_version
    kube.create(web_slice("10.0.0.1", name="web-a"))
    kube.create(web_slice("10.0.0.2", name="web-b"))
    kube.delete("default", "web-a")
    watch = Watch()
    events = collect(watching(watch, api.list_namespaced_endpoint_slice, "default", resource_version=start), 3, watch)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "web-a"),
        ("ADDED", "web-b"),
        ("DELETED", "web-a"),
    ]


@pytest.mark.parametrize("resource_version", [None, "0"])
def test_a_watch_without_a_version_starts_with_the_current_state(
    kube: FakeKube, api: DiscoveryV1Api, resource_version: str | None
) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a"))
    kube.replace(web_slice("10.0.0.3", name="web-a"))
    kube.create(web_slice("10.0.0.2", name="web-b"))
    when_watching(kube, lambda: kube.create(web_slice("10.0.0.4", name="web-c")))
    kwargs = {} if resource_version is None else {"resource_version": resource_version}
    watch = Watch()
    events = collect(watching(watch, api.list_namespaced_endpoint_slice, "default", **kwargs), 3, watch)
    # Synthetic ADDED for the state (web-a once, at its latest), then the changes.
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "web-a"),
        ("ADDED", "web-b"),
        ("ADDED", "web-c"),
    ]
    assert events[0]["object"].endpoints[0].addresses == ["10.0.0.3"]


def test_a_selector_change_is_seen_as_added_and_deleted(kube: FakeKube, api: DiscoveryV1Api) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a", labels={"tier": "front"}))
    start = kube.resource_version
    kube.replace(web_slice("10.0.0.1", name="web-a", labels={"tier": "back"}))
    kube.replace(web_slice("10.0.0.1", name="web-a", labels={"tier": "front"}))
    watch = Watch()
    stream = watching(
        watch, api.list_namespaced_endpoint_slice, "default", label_selector="tier=front", resource_version=start
    )
    events = collect(stream, 2, watch)
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]
    gone = events[0]["object"].metadata
    assert gone.labels["tier"] == "front", "DELETED carries the object as the watcher last selected it"
    assert int(gone.resource_version) == int(start) + 1, "at the version of the change that deselected it"


def test_bookmarks_advance_the_clients_resource_version(kube: FakeKube, api: DiscoveryV1Api) -> None:
    start = kube.resource_version
    kube.create(endpoint_slice("db", [endpoint("10.0.1.1")]))  # not selected: only a bookmark can say it passed

    def bookmark() -> None:
        assert kube.bookmark() == 1

    when_watching(kube, bookmark)
    watch = Watch()
    stream = watching(
        watch,
        api.list_namespaced_endpoint_slice,
        "default",
        label_selector=WEB,
        resource_version=start,
        allow_watch_bookmarks=True,
    )
    (event,) = collect(stream, 1, watch)
    assert event["type"] == "BOOKMARK"
    assert event["raw_object"] == {
        "kind": KIND,
        "apiVersion": API_VERSION,
        "metadata": {"resourceVersion": kube.resource_version},
    }
    assert watch.resource_version == kube.resource_version != start


def test_no_bookmarks_unless_allowed(kube: FakeKube, api: DiscoveryV1Api) -> None:
    def bookmark_then_change() -> None:
        assert kube.bookmark() == 0
        kube.create(web_slice("10.0.0.1"))

    when_watching(kube, bookmark_then_change)
    watch = Watch()
    (event,) = collect(
        watching(watch, api.list_namespaced_endpoint_slice, "default", resource_version=kube.resource_version), 1, watch
    )
    assert event["type"] == "ADDED"


def test_periodic_bookmarks_when_idle() -> None:
    with FakeKube(bookmark_interval=0.05) as kube:
        api = DiscoveryV1Api(kube.api_client())
        watch = Watch()
        stream = watching(
            watch,
            api.list_namespaced_endpoint_slice,
            "default",
            resource_version=kube.resource_version,
            allow_watch_bookmarks=True,
        )
        assert [e["type"] for e in collect(stream, 2, watch)] == ["BOOKMARK", "BOOKMARK"]


def test_send_initial_events_ends_with_an_annotated_bookmark(kube: FakeKube, api: DiscoveryV1Api) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a"))
    watch = Watch()
    stream = watching(
        watch,
        api.list_namespaced_endpoint_slice,
        "default",
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
    )
    added, bookmark = collect(stream, 2, watch)
    assert added["type"] == "ADDED" and bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"]["metadata"] == {
        "resourceVersion": kube.resource_version,
        "annotations": {"k8s.io/initial-events-end": "true"},
    }


def test_a_watch_from_a_compacted_version_is_an_error_event_with_410(kube: FakeKube, api: DiscoveryV1Api) -> None:
    old = kube.resource_version
    kube.create(web_slice("10.0.0.1"))
    kube.compact()
    resp = api.list_namespaced_endpoint_slice(
        "default", watch=True, resource_version=old, _preload_content=False, _request_timeout=READ_TIMEOUT
    )
    try:
        assert resp.status == 200, "the stream started: the error is an event, not the HTTP status"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        lines = [json.loads(line) for line in resp.data.splitlines() if line]
    finally:
        resp.release_conn()
    assert len(lines) == 1 and lines[0]["type"] == "ERROR"
    status = lines[0]["object"]
    assert (status["kind"], status["status"], status["reason"], status["code"]) == ("Status", "Failure", "Expired", 410)
    assert status["message"].startswith(f"too old resource version: {old} (")


def test_the_client_raises_410_after_its_one_retry(kube: FakeKube, api: DiscoveryV1Api) -> None:
    old = kube.resource_version
    kube.create(web_slice("10.0.0.1"))
    kube.compact()
    with pytest.raises(ApiException) as err:
        list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", resource_version=old))
    assert err.value.status == 410
    assert kube.watches == 2, "the client retries once from the same version, then raises"
    with pytest.raises(ApiException) as err:  # with timeoutSeconds the client does not retry
        list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", resource_version=old, timeout_seconds=5))
    assert err.value.status == 410 and kube.watches == 3


def test_history_is_bounded_older_versions_expire() -> None:
    with FakeKube(max_history=3) as kube:
        api = DiscoveryV1Api(kube.api_client())
        start = kube.resource_version
        for i in range(3):
            kube.create(web_slice(f"10.0.0.{i}", name=f"web-{i}"))
        watch = Watch()
        assert (
            len(
                collect(
                    watching(watch, api.list_namespaced_endpoint_slice, "default", resource_version=start), 3, watch
                )
            )
            == 3
        )
        kube.create(web_slice("10.0.0.9", name="web-9"))
        with pytest.raises(ApiException) as err:
            list(
                watching(
                    Watch(), api.list_namespaced_endpoint_slice, "default", resource_version=start, timeout_seconds=5
                )
            )
        assert err.value.status == 410


def test_timeout_seconds_ends_the_stream(kube: FakeKube, api: DiscoveryV1Api) -> None:
    began = time.monotonic()
    events = list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", timeout_seconds=1))
    elapsed = time.monotonic() - began
    assert events == [] and 1.0 <= elapsed < 5.0
    assert kube.requests("watch")[-1].query["timeoutSeconds"] == "1"


def test_a_watch_ended_by_the_server_is_resumed_by_the_client_from_its_last_version(
    kube: FakeKube, api: DiscoveryV1Api
) -> None:
    def end_then_change() -> None:
        kube.create(web_slice("10.0.0.1", name="web-a"))
        poll_until(lambda: kube.drop_watches() == 1, timeout=10, message="the watch to drop")
        poll_until(lambda: kube.watches == 2 and kube.open_watches == 1, timeout=10, message="the client's re-watch")
        kube.create(web_slice("10.0.0.2", name="web-b"))

    when_watching(kube, end_then_change)
    watch = Watch()
    events = collect(
        watching(watch, api.list_namespaced_endpoint_slice, "default", resource_version=kube.resource_version), 2, watch
    )
    assert [e["object"].metadata.name for e in events] == ["web-a", "web-b"]
    second = kube.requests("watch")[1]
    assert second.query["resourceVersion"] == events[0]["object"].metadata.resource_version


def test_an_abrupt_drop_is_a_protocol_error_to_the_client(kube: FakeKube, api: DiscoveryV1Api) -> None:
    when_watching(kube, lambda: kube.drop_watches(abrupt=True))
    with pytest.raises(urllib3.exceptions.ProtocolError):
        list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", resource_version=kube.resource_version))


def test_the_api_server_goes_away_and_comes_back_on_its_port_with_its_state(
    kube: FakeKube, api: DiscoveryV1Api
) -> None:
    kube.create(web_slice("10.0.0.1", name="web-a"))
    port, version = kube.port, kube.resource_version
    when_watching(kube, kube.stop)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", resource_version=version))
    poll_until(lambda: not kube.running, 10, message="the stop finished")  # it runs in the watching thread
    refused = DiscoveryV1Api(kube.api_client())
    refused.api_client.configuration.retries = 0
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        refused.list_namespaced_endpoint_slice("default", _request_timeout=2)
    kube.start()
    assert kube.port == port
    listed = api.list_namespaced_endpoint_slice("default")
    assert [i.metadata.name for i in listed.items] == ["web-a"] and listed.metadata.resource_version == version
    assert int(kube.create(web_slice("10.0.0.2"))["metadata"]["resourceVersion"]) == int(version) + 1


# --- auth, TLS, configuration


def test_the_in_cluster_loader_is_served_as_a_pod_would_be(tmp_path: Path) -> None:
    """kubernetes.config's in-cluster loader (what `serve` uses in a pod) reads the service account's token and CA
    files and the KUBERNETES_SERVICE_* variables, and sends `Authorization: bearer <token>` in lower case. The API
    server's bearer authenticator takes the scheme in any case, so the fake must too, or in-cluster access would
    look refused here while it works in a cluster."""
    from kubernetes.config.incluster_config import InClusterConfigLoader

    pki = make_pki(tmp_path / "pki")
    with FakeKube(tls=pki.server, ca=pki.ca) as kube:
        kube.create(web_slice("10.0.0.1"))
        token = tmp_path / "token"
        token.write_text(kube.token)
        config = kubernetes.client.Configuration()
        environ = {"KUBERNETES_SERVICE_HOST": kube.host, "KUBERNETES_SERVICE_PORT": str(kube.port)}
        InClusterConfigLoader(str(token), str(pki.ca), environ=environ).load_and_set(config)
        assert config.api_key["BearerToken"].startswith("bearer ")
        api = DiscoveryV1Api(kubernetes.client.ApiClient(config))
        assert len(api.list_namespaced_endpoint_slice("default").items) == 1
        config.refresh_api_key_hook = None  # the loader's hook would put its own header back before each call
        for scheme in ("BEARER", "Basic"):
            config.api_key["BearerToken"] = f"{scheme} {kube.token}"
            if scheme == "BEARER":
                assert len(api.list_namespaced_endpoint_slice("default").items) == 1
            else:
                with pytest.raises(ApiException) as err:
                    api.list_namespaced_endpoint_slice("default")
                assert err.value.status == 401


def test_requests_without_the_bearer_token_are_401(kube: FakeKube) -> None:
    for token in (None, "wrong"):
        config = kube.configuration()
        config.api_key = {} if token is None else {"BearerToken": token}
        api = DiscoveryV1Api(kubernetes.client.ApiClient(config))
        with pytest.raises(ApiException) as err:
            api.list_namespaced_endpoint_slice("default")
        assert err.value.status == 401
        assert json.loads(err.value.body) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Unauthorized",
            "reason": "Unauthorized",
            "code": 401,
        }
        with pytest.raises(ApiException) as err:
            list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", timeout_seconds=5))
        assert err.value.status == 401
    assert kube.lists == 0 and kube.watches == 0, "refused requests are not counted as lists or watches"
    assert len(kube.requests()) == 4


def test_tls_with_the_test_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with FakeKube(tls=pki.server, ca=pki.ca) as kube:
        assert kube.base_url.startswith("https://")
        kube.create(web_slice("10.0.0.1"))
        api = DiscoveryV1Api(kube.api_client())
        assert len(api.list_namespaced_endpoint_slice("default").items) == 1
        watch = Watch()
        assert collect(watching(watch, api.list_namespaced_endpoint_slice, "default"), 1, watch)[0]["type"] == "ADDED"
        wrong = kube.configuration()
        wrong.ssl_ca_cert = str(pki.other_ca)
        wrong.retries = 0
        with pytest.raises(urllib3.exceptions.MaxRetryError) as err:
            DiscoveryV1Api(kubernetes.client.ApiClient(wrong)).list_namespaced_endpoint_slice("default")
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
        assert kube.lists == 1


@pytest.mark.parametrize("token_file", [False, True])
def test_a_kubeconfig_for_a_separate_process(tmp_path: Path, token_file: bool) -> None:
    pki = make_pki(tmp_path / "pki")
    with FakeKube(tls=pki.server, ca=pki.ca) as kube:
        kube.create(web_slice("10.0.0.1"))
        path = kube.write_kubeconfig(tmp_path / "kubeconfig", token_file=tmp_path / "token" if token_file else None)
        assert (kube.token in path.read_text()) is not token_file
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(path), client_configuration=config)
        api = DiscoveryV1Api(kubernetes.client.ApiClient(config))
        assert len(api.list_namespaced_endpoint_slice("default", label_selector=WEB).items) == 1


_WATCHER_PROCESS = """
import json, sys
import kubernetes
kubernetes.config.load_kube_config()  # KUBECONFIG, as a control plane started with --kubeconfig reads it
api = kubernetes.client.DiscoveryV1Api()
watch, selector = kubernetes.watch.Watch(), sys.argv[1]
for event in watch.stream(api.list_namespaced_endpoint_slice, "default", label_selector=selector, timeout_seconds=20):
    print(json.dumps({"type": event["type"], "addresses": event["object"].endpoints[0].addresses}), flush=True)
    watch.stop()
"""


def test_a_separately_started_process_watches_it(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with FakeKube(tls=pki.server, ca=pki.ca) as kube:
        path = kube.write_kubeconfig(tmp_path / "kubeconfig", token_file=tmp_path / "token")
        env = {**os.environ, "KUBECONFIG": str(path)}
        with subprocess.Popen(
            [sys.executable, "-c", _WATCHER_PROCESS, WEB], env=env, stdout=subprocess.PIPE, text=True
        ) as process:
            try:
                poll_until(lambda: kube.open_watches == 1 or process.poll() is not None, timeout=30, message="watch")
                kube.create(web_slice("10.0.0.7"))
                assert process.wait(timeout=30) == 0
                assert process.stdout is not None
                assert json.loads(process.stdout.read()) == {"type": "ADDED", "addresses": ["10.0.0.7"]}
            finally:
                process.kill()
        assert kube.watches == 1


def test_request_counts(kube: FakeKube, api: DiscoveryV1Api) -> None:
    api.list_namespaced_endpoint_slice("default")
    api.list_endpoint_slice_for_all_namespaces()
    list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", timeout_seconds=1))
    assert (kube.lists, kube.watches) == (2, 1)
    assert [r.namespace for r in kube.requests("list")] == ["default", None]


async def test_usable_from_an_async_test(kube: FakeKube, api: DiscoveryV1Api) -> None:
    """The controls never block the event loop; the client runs in a thread, as the control plane runs it."""
    import asyncio

    listed = await asyncio.to_thread(api.list_namespaced_endpoint_slice, "default")
    watch = Watch()
    stream = watching(
        watch, api.list_namespaced_endpoint_slice, "default", resource_version=listed.metadata.resource_version
    )
    task = asyncio.create_task(asyncio.to_thread(collect, stream, 1, watch))
    deadline = time.monotonic() + 10
    while kube.open_watches == 0:
        assert time.monotonic() < deadline, "watch never opened"
        await asyncio.sleep(0.01)  # poll interval
    kube.create(web_slice("10.0.0.1"))
    (event,) = await asyncio.wait_for(task, 10)
    assert event["type"] == "ADDED"


def test_injected_failures_answer_the_api_servers_status(kube: FakeKube, api: DiscoveryV1Api) -> None:
    kube.fail_next(403)
    with pytest.raises(ApiException) as err:
        api.list_namespaced_endpoint_slice("default")
    status = json.loads(err.value.body)
    assert err.value.status == 403 and status["reason"] == "Forbidden"
    assert (
        'cannot list resource "endpointslices" in API group "discovery.k8s.io" in the namespace "default"'
        in (status["message"])
    )
    kube.fail_next(429, verb="watch")
    assert api.list_namespaced_endpoint_slice("default").items == [], "only the next watch fails"
    with pytest.raises(ApiException) as err:
        list(watching(Watch(), api.list_namespaced_endpoint_slice, "default"))
    assert err.value.status == 429 and json.loads(err.value.body)["reason"] == "TooManyRequests"
    # With Retry-After, urllib3 (under the client) waits and retries by itself: the caller never sees the 429.
    kube.fail_next(429, retry_after=1, verb="watch")
    began = time.monotonic()
    assert list(watching(Watch(), api.list_namespaced_endpoint_slice, "default", timeout_seconds=1)) == []
    assert time.monotonic() - began >= 2.0, "Retry-After (1 s), then the watch's own timeout (1 s)"
    assert [r.status for r in kube.requests("watch")[-2:]] == [429, 200]
    kube.fail_next(500, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            api.list_namespaced_endpoint_slice("default")
        assert err.value.status == 500
    assert api.list_namespaced_endpoint_slice("default").items == []
    assert [r.status for r in kube.requests()] == [403, 200, 429, 429, 200, 500, 500, 200]
    assert (kube.lists, kube.watches) == (5, 3), "failed requests count: a backoff test counts attempts"


def test_a_watcher_that_falls_behind_is_ended_cleanly() -> None:
    """A client that stops reading: once its queue (``watch_queue``) overflows the watch is ended, as the watch
    cache ends a watcher that cannot keep up, and nothing grows without bound. What was sent ends with the
    stream's last chunk, so a client resumes from the last event it read."""
    with FakeKube(watch_queue=3) as kube, socket.create_connection((kube.host, kube.port)) as reader:
        reader.settimeout(READ_TIMEOUT)
        kube.validate = False  # these slices are valid; checking 1000 addresses per write only slows the test
        path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        path += f"?watch=1&resourceVersion={kube.resource_version}"
        reader.sendall(f"GET {path} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer {kube.token}\r\n\r\n".encode())
        poll_until(lambda: kube.open_watches == 1, timeout=10, message="watch open")
        big = [endpoint(f"10.{i // 250}.{i % 250}.1", pod=f"web-{i}") for i in range(1000)]  # ~100 kB a slice
        for _ in range(2000):  # until the socket buffers are full and the queue behind them too
            kube.create(endpoint_slice("web", big))
            if kube.open_watches == 0:
                break
        assert kube.open_watches == 0, "a watcher that reads nothing is never ended"
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = reader.recv(1 << 16)
            assert chunk, "connection closed before the stream's last chunk"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
