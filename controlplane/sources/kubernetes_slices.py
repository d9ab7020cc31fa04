"""EndpointSlices → a Service's ready endpoints: the pure part of Kubernetes discovery (no I/O, no clock).

The watch (sources/kubernetes.py) feeds each object it lists or is told about through `parse_slice` and keeps the
results by slice name; `ready_endpoints` turns them into the addresses one backend is served by. Everything an API
server sends is treated as untrusted: a field of the wrong type makes that slice or endpoint count as absent, never
an exception, and the caps bound what one Service can make the control plane hold and push
(docs/kubernetes-endpoints.md).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.model.policy import Endpoint

# The label the EndpointSlice controller puts on every slice it manages for a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Only IP slices: an FQDN slice would need Envoy's DNS resolution, which an EDS cluster does not do.
ADDRESS_TYPES = frozenset({"IPv4", "IPv6"})
MAX_SLICES_PER_SERVICE = 1000  # Kubernetes puts up to 100 endpoints in a slice: 100,000 endpoints
MAX_ENDPOINTS_PER_SERVICE = 5000  # what one backend's assignment may hold; past it the first by address are kept
# Ready addresses (served or refused) one Service's slices may hold in memory, all slices together. Without it,
# anyone who can write EndpointSlices in one backend's namespace could make the control plane of every backend hold
# 1,000 slices of 1,000 endpoints per Service (the API's own limits: 72 MiB kept, 600 MiB while listing, per
# Service). Ten times what an assignment holds: a real Service never comes near it.
MAX_ADDRESSES_PER_SERVICE = 10 * MAX_ENDPOINTS_PER_SERVICE

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Addresses no Service endpoint is given to, by why they are refused: a request sent there would reach the gateway's
# own host (its Envoy admin port, other local listeners) or a cloud's metadata service, carrying the backend's
# injected credential. Anyone who can write an EndpointSlice in the backend's namespace can list one, and an API
# server older than the fix of CVE-2021-25737 (or another API server) stores it (docs/kubernetes-endpoints.md).
# Checked in order: the first network holding an address names the reason.
REFUSED_NETWORKS: tuple[tuple[str, Network], ...] = tuple(
    (reason, ipaddress.ip_network(network))
    for reason, network in (
        ("unspecified", "0.0.0.0/8"),  # "this host on this network": 0.0.0.0 connects to the local host
        ("loopback", "127.0.0.0/8"),
        ("link-local", "169.254.0.0/16"),  # 169.254.169.254: AWS, GCP, Azure, OpenStack metadata
        ("metadata", "100.100.100.200/32"),  # Alibaba Cloud's metadata service (in the shared 100.64/10 range)
        ("multicast", "224.0.0.0/4"),
        ("reserved", "240.0.0.0/4"),  # includes the broadcast address 255.255.255.255
        ("unspecified", "::/128"),
        ("loopback", "::1/128"),
        ("ipv4-mapped", "::ffff:0:0/96"),  # ::ffff:127.0.0.1 is 127.0.0.1 to a dual-stack socket
        ("ipv4-compatible", "::/96"),  # deprecated (RFC 4291): ::127.0.0.1 and friends
        ("link-local", "fe80::/10"),
        ("metadata", "fd00:ec2::254/128"),  # AWS's metadata service over IPv6
        ("metadata", "fd20:ce::254/128"),  # GCP's metadata service over IPv6
        ("multicast", "ff00::/8"),
    )
)


@dataclass(frozen=True)
class SlicePort:
    name: str  # "" for a Service port without a name (a single-port Service)
    port: int
    protocol: str


@dataclass(frozen=True)
class Slice:
    """What of one EndpointSlice discovery uses: its ports and its ready addresses (first address of each ready
    endpoint: Kubernetes documents the others as fungible, and consumers may use only the first)."""

    name: str
    ports: tuple[SlicePort, ...]
    addresses: tuple[str, ...]
    refused: tuple[tuple[str, str], ...] = ()  # (address, reason) of ready endpoints left out: see REFUSED_NETWORKS


def refusal(address: str, allow: tuple[Network, ...] = ()) -> str | None:
    """Why no traffic may be sent to `address` (canonical, as `_ip` gives it), or None. `allow`: networks an operator
    explicitly lets through anyway (`serve --kube-allow-endpoints`, for test clusters whose pods are on loopback)."""
    ip = ipaddress.ip_address(address)
    if any(ip in network for network in allow):
        return None
    return next((reason for reason, network in REFUSED_NETWORKS if ip in network), None)


def parse_slice(obj: object, allow: tuple[Network, ...] = ()) -> Slice | None:
    """One EndpointSlice as JSON decoded (`metadata`, `addressType`, `ports`, `endpoints`); None when it has no name
    or is not an IP slice. Endpoints whose `conditions.ready` is false are left out; unset counts as ready, as the
    EndpointSlice API documents (consumers should interpret an unknown state as ready). Ready endpoints at a refused
    address (REFUSED_NETWORKS, less `allow`) are left out too, and listed in `refused` for the watch to report."""
    if not isinstance(obj, Mapping):
        return None
    name = _get(obj, "metadata", "name")
    if not isinstance(name, str) or not name or obj.get("addressType") not in ADDRESS_TYPES:
        return None
    ready = _ready_addresses(obj.get("endpoints"), obj["addressType"])
    judged = [(address, refusal(address, allow)) for address in ready]
    return Slice(
        name,
        _ports(obj.get("ports")),
        tuple(address for address, reason in judged if reason is None),
        tuple((address, reason) for address, reason in judged if reason is not None),
    )


def _ports(value: object) -> tuple[SlicePort, ...]:
    ports = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, Mapping):
            continue
        name, port, protocol = item.get("name") or "", item.get("port"), item.get("protocol") or "TCP"
        if isinstance(name, str) and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            ports.append(SlicePort(name, port, protocol if isinstance(protocol, str) else ""))
    return tuple(ports)


def _ready_addresses(value: object, address_type: str) -> tuple[str, ...]:
    addresses = []
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, Mapping) or not _ready(item.get("conditions")):
            continue
        listed = item.get("addresses")
        first = listed[0] if isinstance(listed, list) and listed else None
        address = _ip(first, address_type)
        if address is not None:
            addresses.append(address)
    return tuple(addresses)


def _ready(conditions: object) -> bool:
    """`ready` unset (or no conditions at all) is ready; only an explicit false (or a non-boolean) is not."""
    if conditions is None:
        return True
    if not isinstance(conditions, Mapping):
        return False
    ready = conditions.get("ready")
    return ready is None or ready is True


def _ip(value: object, address_type: str) -> str | None:
    """The address in its canonical form (so `::1` and `0::1` dedupe), of the slice's family, or None. Not one with
    a zone (`fd00::1%eth0`): Python parses it, the API server refuses it, and Envoy NACKs the assignment holding
    it, after which the backend followed no change at all."""
    if not isinstance(value, str) or len(value) > 45 or "%" in value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if ip.version != (4 if address_type == "IPv4" else 6):
        return None
    return str(ip)


def _get(obj: Mapping[str, object], *keys: str) -> object:
    value: object = obj
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def slice_port(slice_: Slice, port: str | int) -> int | None:
    """The port the slice's endpoints listen on for the Service port `port` (its name, or a number: the endpoint
    port itself), TCP only. Resolved per slice: slices of one Service may give one name different numbers (pods of
    two versions during a rollout)."""
    for p in slice_.ports:
        if p.protocol != "TCP":
            continue
        if (isinstance(port, str) and p.name == port) or (isinstance(port, int) and p.port == port):
            return p.port
    return None


@dataclass(frozen=True)
class Endpoints:
    """A Service's ready endpoints for one port; `capped`: more were ready than MAX_ENDPOINTS_PER_SERVICE."""

    endpoints: tuple[Endpoint, ...]
    capped: bool = False


def ready_endpoints(slices: Iterable[Slice], port: str | int, limit: int = MAX_ENDPOINTS_PER_SERVICE) -> Endpoints:
    """Every ready (address, port) across the slices, deduplicated (an endpoint may be in two slices while the
    controller moves it) and sorted, so equal sets compile to equal bytes."""
    found = {
        Endpoint(address, number)
        for s in slices
        if (number := slice_port(s, port)) is not None
        for address in s.addresses
    }
    ordered = sorted(found, key=endpoint_order)
    return Endpoints(tuple(ordered[:limit]), capped=len(ordered) > limit)


def endpoint_order(endpoint: Endpoint) -> tuple[int, int, int]:
    """IPv4 before IPv6, then numerically: one order for every replica."""
    ip = ipaddress.ip_address(endpoint.address)
    return ip.version, int(ip), endpoint.port


@dataclass(frozen=True)
class Applied:
    """The slices after one watch event, and whether what they serve may have changed."""

    slices: Mapping[str, Slice]
    changed: bool
    dropped: bool = False  # a new slice was left out: the Service is at MAX_SLICES_PER_SERVICE


def apply_event(
    slices: Mapping[str, Slice],
    kind: str,
    obj: object,
    limit: int = MAX_SLICES_PER_SERVICE,
    allow: tuple[Network, ...] = (),
) -> Applied:
    """ADDED/MODIFIED/DELETED of one slice, copy on write: readers (a compile in another thread) keep a consistent
    mapping. BOOKMARK and ERROR events are the watch's business, not the slices'."""
    name = _get(obj, "metadata", "name") if isinstance(obj, Mapping) else None
    if kind == "DELETED":
        if not isinstance(name, str) or name not in slices:
            return Applied(slices, False)
        return Applied({k: v for k, v in slices.items() if k != name}, True)
    if kind not in ("ADDED", "MODIFIED"):
        return Applied(slices, False)
    parsed = parse_slice(obj, allow)
    if parsed is None:  # not (or no longer) an IP slice: what it held is gone
        if isinstance(name, str) and name in slices:
            return Applied({k: v for k, v in slices.items() if k != name}, True)
        return Applied(slices, False)
    if slices.get(parsed.name) == parsed:
        return Applied(slices, False)
    if parsed.name not in slices and len(slices) >= limit:
        return Applied(slices, False, dropped=True)
    others = {k: v for k, v in slices.items() if k != parsed.name}
    if sum(map(held, others.values())) + held(parsed) > MAX_ADDRESSES_PER_SERVICE:
        # Left out, and what it held before with it: its old addresses are no longer what Kubernetes says.
        return Applied(others, True, dropped=True) if parsed.name in slices else Applied(slices, False, dropped=True)
    return Applied({**slices, parsed.name: parsed}, True)


def from_list(
    items: Iterable[object], limit: int = MAX_SLICES_PER_SERVICE, allow: tuple[Network, ...] = ()
) -> tuple[dict[str, Slice], bool]:
    """A list response's items; True when some were left out at the cap (the first by name are kept, so two
    replicas capping one Service keep the same ones)."""
    return keep_first((s for item in items if (s := parse_slice(item, allow)) is not None), limit)


def held(slice_: Slice) -> int:
    """Addresses a slice makes the control plane hold: served and refused alike (a slice of refused addresses is
    kept to be reported, so it counts against the bound too)."""
    return len(slice_.addresses) + len(slice_.refused)


def keep_first(parsed: Iterable[Slice], limit: int = MAX_SLICES_PER_SERVICE) -> tuple[dict[str, Slice], bool]:
    """The first slices by name, at most `limit` of them and MAX_ADDRESSES_PER_SERVICE addresses in all; True when
    some were left out. By name, so two replicas capping one Service keep the same ones."""
    kept: dict[str, Slice] = {}
    total = 0
    ordered = sorted(parsed, key=lambda s: s.name)
    for slice_ in ordered[:limit]:
        total += held(slice_)
        if total > MAX_ADDRESSES_PER_SERVICE:
            return kept, True
        kept[slice_.name] = slice_
    return kept, len(ordered) > limit
