"""`kind: Gateway`: one Envoy listener and the backends it fronts."""

from __future__ import annotations

from controlplane.model import scalars
from controlplane.model.documents import COMMON_KEYS, Doc, Env
from controlplane.model.fields import Fields, list_of, need, record
from controlplane.model.policy import Gateway

_GATEWAY_KEYS = (*COMMON_KEYS, "listen", "backends", "access_log")


def _listen_fields(f: Fields) -> tuple[str, int]:
    address, port = f.optional("address", scalars.ip, "0.0.0.0"), f.required("port", scalars.port)
    return need(address), need(port)


_listen = record(_listen_fields, ("address", "port"))


def build(doc: Doc, env: Env) -> Gateway:
    f = Fields(doc.ctx, doc.node, "", _GATEWAY_KEYS)
    listen = f.required("listen", _listen)
    backends = f.required("backends", list_of(env.reference("Backend")))
    access_log = f.optional("access_log", scalars.absolute_path, "/dev/stdout")
    address, port = need(listen)
    return Gateway(
        name=need(doc.name),
        address=address,
        port=port,
        backends=tuple(sorted(need(backends))),
        access_log_path=need(access_log),
        source=doc.source,
    )
