"""The RFC 8693 request a CI job sends to the token exchange, as the end-to-end tests send it."""

from __future__ import annotations

from urllib.parse import urlencode

from controlplane.model.credentials import EXCHANGE_PATH

from .backends import HttpResponse, http_request
from .ports import LOOPBACK


def post_exchange(port: int, subject: str, audience: str, *, host: str | None = None, **fields: str) -> HttpResponse:
    """POST the exchange form to `port`: a gateway's listener (`host` picks the backend's route, as a job's
    request does) or the control plane's exchange port itself (no `host`)."""
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": audience,
        **fields,
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if host is not None:
        headers["Host"] = host
    url = f"http://{LOOPBACK}:{port}{EXCHANGE_PATH}"
    return http_request(url, method="POST", headers=headers, body=urlencode(form).encode())
