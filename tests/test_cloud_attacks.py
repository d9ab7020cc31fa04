"""Issue 16 attacked from outside: a policy author, a hostile STS or Google answer (tests/test_e2e_cloud_attacks.py
has those needing a real Envoy). Each test failed before its fix."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2

from controlplane.cli.main import main
from controlplane.cloud.aws import AwsCredential, Refresher, Sts, StsError
from controlplane.cloud.gcp import (
    CloudCredential,
    GcpCredentialRefresher,
    GcpExchangeError,
    GcpSettings,
    fetch_credential,
)
from controlplane.compiler.aws import COPY_SOURCE_HEADER
from controlplane.compiler.compile import compile_policy
from controlplane.credentials.keys import FileKeyStore, SigningKeys
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import AwsSigning
from controlplane.runtime.aws_signing import source_factory
from controlplane.snapshots.snapshot import ROUTE
from tests.support.fake_aws import REGION, FakeAws, WebIdentityTrust
from tests.support.ports import LOOPBACK

ISSUER = "https://controlplane.example.test/oidc"
TEAM_A_ROLE_SUBJECT = "backend:team-a-s3"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    store = FileKeyStore(Path(tmp_path_factory.mktemp("keys")) / "signing-keys.json")
    return SigningKeys(store, rotate_every=86400, max_credential_ttl=3600, publish_lead=600)


@pytest.fixture(scope="module")
def aws(keys: SigningKeys) -> Iterator[FakeAws]:
    """Team A's role trusts the control plane's issuer for team A's backend only, as docs/aws-credentials.md says."""
    fake = FakeAws().start(WebIdentityTrust(ISSUER, "sts.amazonaws.com", TEAM_A_ROLE_SUBJECT, keys.published_jwks))
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(autouse=True)
def _sts_at_the_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, aws: FakeAws) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", aws.endpoint)


def test_a_policy_author_cannot_borrow_another_teams_web_identity_role(aws: FakeAws, keys: SigningKeys) -> None:
    """Before: every web-identity token said `sub: controlplane`, so a role trusting the issuer trusted every
    backend of every policy: team B names team A's role ARN on its own backend and its jobs' requests are signed
    as team A. Now the subject is the backend, which team A's role trusts alone."""
    how = AwsSigning(service="s3", region=REGION, role_arn=aws.web_role_arn)
    factory = source_factory(ISSUER, keys)
    with pytest.raises(StsError, match="AccessDenied"):
        factory("team-b-s3", how).fetch()
    assert factory("team-a-s3", how).fetch().role_arn == aws.web_role_arn
    tokens = [call["WebIdentityToken"] for call in aws.web_identity_calls[-2:]]
    assert [jwt.decode(t, options={"verify_signature": False})["sub"] for t in tokens] == [
        "backend:team-b-s3",
        TEAM_A_ROLE_SUBJECT,
    ]


def test_a_binding_cannot_borrow_another_backends_role_as_its_own() -> None:
    """Before: a binding granting on team B's backend with `aws_role_arn` = team A's backend role was signed with the
    credential obtained for team A's backend (roles are refreshed by ARN), the trust given to A ridden by B."""
    team_a = "arn:aws:iam::123456789012:role/team-a-deploy"
    role = "kind: Role\nname: b-write\nbackend: team-b-s3\nrules: [{methods: [PUT]}]\n"
    binding = (
        "kind: Binding\nname: b-deploys\nissuer: gitlab\nroles: [b-write]\nsubjects: [{project: 42}]\n"
        f"aws_role_arn: '{team_a}'\n"
    )
    inventory = "groups: [{id: 1, path: g}]\nprojects: [{id: 42, path: g/p, namespace_id: 1}]\n"
    files = {
        "a.yaml": BASE.replace("https://g.example.com\n", "https://g.example.com\ninventory: inv.yaml\n")
        + "---\n"
        + _backend("team-a-s3", team_a),
        "b.yaml": _backend("team-b-s3", "arn:aws:iam::123456789012:role/team-b-read")
        + "---\n"
        + role
        + "---\n"
        + binding,
        "inv.yaml": inventory,
    }
    with pytest.raises(PolicyInvalid) as refused:
        parse_policy(files)
    assert "already signs for backend team-a-s3, not also for team-b-s3" in str(refused.value)
    files["b.yaml"] = files["b.yaml"].replace(team_a, "arn:aws:iam::123456789012:role/team-b-deploy")
    assert parse_policy(files).bindings[0].aws_role_arn is not None


def test_an_aws_backend_without_tls_may_not_have_a_wildcard_host() -> None:
    """Before: accepted, and Envoy signed the Host each job sent: with S3 virtual-hosted buckets a job read another
    bucket's object through a path its grant allowed (observed through Envoy and moto before the fix)."""
    arn = "arn:aws:iam::123456789012:role/team-a-read"
    aws = f"aws: {{service: s3, region: eu-west-1, role_arn: '{arn}'}}\n"
    wildcard = (
        "kind: Backend\nname: team-a-s3\nhosts: ['*.s3.eu-west-1.amazonaws.com']\naudience: https://s3\n"
        "endpoints: [{address: 127.0.0.1, port: 1}]\n" + aws
    )
    gateway = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [team-a-s3]\n"
    issuer = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
    with pytest.raises(PolicyInvalid, match="wildcard host on an aws: backend without tls"):
        parse_policy({"p.yaml": "---\n".join([issuer, gateway, wildcard])})
    pinned = wildcard.replace("endpoints:", "tls: {sni: ci-artifacts.s3.eu-west-1.amazonaws.com}\nendpoints:")
    assert parse_policy({"p.yaml": "---\n".join([issuer, gateway, pinned])}).backends[0].tls is not None


def test_a_gcp_backend_may_not_have_public_paths() -> None:
    """Before: accepted, and the injector (on for the whole virtual host) put the service account's token into the
    requests of a public path, which take no token at all: anyone reaching the gateway called it as the account.
    AWS backends already refuse public paths for the same reason."""
    gcp = (
        "gcp:\n  workload_identity_provider: projects/123456789/locations/global/workloadIdentityPools/pool-1/"
        "providers/cp-1\n  service_account: gcs-reader@acme-prod.iam.gserviceaccount.com\n"
    )
    backend = "kind: Backend\nname: gcs\nhosts: [gcs.local]\nendpoints: [{address: 127.0.0.1, port: 1}]\n" + gcp
    gateway = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [gcs]\n"
    issuer = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
    assert parse_policy({"p.yaml": "---\n".join([issuer, gateway, backend])}).backends[0].gcp is not None
    with pytest.raises(PolicyInvalid, match="public path would lend it to anyone"):
        parse_policy({"p.yaml": "---\n".join([issuer, gateway, backend + "public_paths: [/healthz]\n"])})


BASE = (
    "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n---\n"
    "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [team-a-s3, team-b-s3]\n"
)


def _backend(name: str, arn: str) -> str:
    return (
        f"kind: Backend\nname: {name}\nhosts: [{name}.local]\nendpoints: [{{address: 127.0.0.1, port: 1}}]\n"
        f"aws: {{service: s3, region: eu-west-1, role_arn: '{arn}'}}\n"
    )


def test_two_backends_on_one_role_are_refused_as_the_second_would_ride_on_the_first() -> None:
    """Before: accepted, and one credential (obtained for the first backend by name) signed both backends."""
    arn = "arn:aws:iam::123456789012:role/team-a-deploy"
    files = {
        "a.yaml": BASE + "---\n" + _backend("team-a-s3", arn),
        "b.yaml": _backend("team-b-s3", arn),
    }
    with pytest.raises(PolicyInvalid) as refused:
        parse_policy(files)
    text = str(refused.value)
    assert "b.yaml" in text and "already signs for backend team-a-s3" in text
    files["b.yaml"] = _backend("team-b-s3", "arn:aws:iam::123456789012:role/team-b-deploy")
    assert len(parse_policy(files).backends) == 2


# -- hostile or broken STS / Google answers (a raw HTTP server answering what the test says)


class Hostile:
    """An HTTP server on loopback answering every POST with `body` (bytes, or a callable of the path)."""

    def __init__(self, body: bytes, content_type: str = "text/xml", *, chunked: bool = False) -> None:
        self.body = body
        self.content_type = content_type
        self.chunked = chunked  # no Content-Length, the body in small chunks, each its own write
        self.posts: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.posts.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", outer.content_type)
                if not outer.chunked:
                    self.send_header("Content-Length", str(len(outer.body)))
                    self.end_headers()
                    self.wfile.write(outer.body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for at in range(0, len(outer.body), 1000):
                    piece = outer.body[at : at + 1000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Hostile:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


ROLE = "arn:aws:iam::123456789012:role/ci-read"


def _sts_answer(expiration: str, assumed: str = "arn:aws:sts::123456789012:assumed-role/ci-read/s") -> bytes:
    return (
        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<AssumeRoleWithWebIdentityResult>"
        f"<AssumedRoleUser><Arn>{assumed}</Arn><AssumedRoleId>AROAX:s</AssumedRoleId></AssumedRoleUser>"
        "<Credentials><SessionToken>hostile-session-token</SessionToken><SecretAccessKey>hostile-secret"
        f"</SecretAccessKey><Expiration>{expiration}</Expiration><AccessKeyId>ASIAHOSTILE</AccessKeyId>"
        "</Credentials></AssumeRoleWithWebIdentityResult>"
        "<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
    ).encode()


@dataclass
class _Unsigned:
    """AssumeRoleWithWebIdentity (unsigned: no AWS key needed) against the hostile endpoint."""

    sts: Sts

    def fetch(self) -> AwsCredential:
        return self.sts.assume_role_with_web_identity(ROLE, "hostile.token.here", "session", 900)


def test_an_sts_expiration_in_year_9999_is_believed_only_up_to_the_duration_asked() -> None:
    """Before: the credential was kept 'fresh' for ever (never refreshed) while AWS ends the session on time."""
    with Hostile(_sts_answer("9999-12-31T23:59:59Z")) as hostile:
        credential = _Unsigned(Sts(region=REGION, endpoint_url=hostile.url)).fetch()
    assert credential.expiration <= time.time() + 900 + 1


def test_an_sts_answer_for_another_role_is_refused() -> None:
    """A misrouted or hostile STS answering a session of another role (another account) signs nothing."""
    for other in (
        "arn:aws:sts::999999999999:assumed-role/ci-read/s",
        "arn:aws:sts::123456789012:assumed-role/ci-admin/s",
        "arn:aws:sts::123456789012:assumed-role/ci-readX/s",
    ):
        with Hostile(_sts_answer("2099-01-01T00:00:00Z", assumed=other)) as hostile, pytest.raises(StsError) as e:
            _Unsigned(Sts(region=REGION, endpoint_url=hostile.url)).fetch()
        assert e.value.code == "OtherRoleAnswered"


def test_an_sts_credential_expired_on_arrival_backs_off_instead_of_looping() -> None:
    """Before: counted a success, due again at once: every poll called STS and recompiled (a tight loop on the
    refresher's thread), and the expired credential was announced to the compiler."""
    announced: list[AwsCredential | None] = []
    with Hostile(_sts_answer("2001-01-01T00:00:00Z")) as hostile:
        refresher = Refresher("s3", _Unsigned(Sts(region=REGION, endpoint_url=hostile.url)), on_change=announced.append)
        wakes = [refresher.poll() for _ in range(5)]
        calls = len(hostile.posts)
    assert announced == [] and refresher.current() is None
    assert refresher.state.failures >= 1 and wakes[0] > time.time()
    assert calls == 1  # the next attempt waits for its backoff


PROVIDER = "projects/123456789/locations/global/workloadIdentityPools/gitlab-ci/providers/controlplane"
SA = "gcs-reader@acme-prod.iam.gserviceaccount.com"


def _gcp_fetch(answer: dict[str, object] | bytes, chunked: bool = False, **settings: object) -> CloudCredential:
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    with Hostile(body, "application/json", chunked=chunked) as hostile:
        gcp = GcpSettings("gcs", PROVIDER, SA, sts_url=hostile.url + "/v1/token",
                          iam_credentials_url=hostile.url + "/v1", **settings)  # type: ignore[arg-type]  # fmt: skip

        async def run() -> CloudCredential:
            async with aiohttp.ClientSession() as session:
                return await fetch_credential(session, gcp, "subject", time.time())

        return asyncio.run(run())


def _id_token(exp: int) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{payload}.sig"


def test_a_google_expiry_in_year_9999_is_believed_only_up_to_the_lifetime() -> None:
    answer = {"access_token": "t", "token_type": "Bearer", "accessToken": "t", "expireTime": "9999-12-31T23:59:59Z"}
    assert _gcp_fetch(answer).expires_at <= time.time() + 3600 + 1
    id_answer = {"access_token": "t", "token_type": "Bearer", "token": _id_token(253402300799)}
    assert _gcp_fetch(id_answer, id_token_audience="https://run.example").expires_at <= time.time() + 3600 + 1


def test_a_huge_google_answer_is_refused_unread() -> None:
    """Before: read whole into memory (here 8 MiB; any size the endpoint sends). With a length or without one."""
    huge = b'{"access_token": "' + b"x" * (8 << 20) + b'"}'
    with pytest.raises(GcpExchangeError, match="over"):
        _gcp_fetch(huge)
    with pytest.raises(GcpExchangeError, match="over"):
        _gcp_fetch(huge, chunked=True)


def test_an_answer_arriving_in_pieces_is_read_whole() -> None:
    """The bound reads until the end: an answer in many small writes (a slow network) is not cut short."""
    answer = {
        "access_token": "t",
        "token_type": "Bearer",
        "accessToken": "a" * 20000,
        "expireTime": "2099-01-01T00:00:00Z",
    }
    assert len(_gcp_fetch(json.dumps(answer).encode(), chunked=True).token) == 20000


def test_a_google_credential_expired_on_arrival_backs_off_instead_of_looping() -> None:
    """Before: a success due again at once; `run()` exchanged at STS and pushed SDS in a tight loop."""
    fetched: list[float] = []

    async def fetch(_settings: GcpSettings, now: float) -> CloudCredential:
        fetched.append(now)
        return CloudCredential("t", expires_at=now - 5, issued_at=now)

    changes: list[int] = []
    refresher = GcpCredentialRefresher(GcpSettings("gcs", PROVIDER, SA), fetch, on_change=lambda: changes.append(1))

    async def run() -> None:
        sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) >= 5:
                raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await refresher.run(sleep)
        assert all(s > 0 for s in sleeps), sleeps

    asyncio.run(run())
    refresher.stop()
    assert refresher.current() is None and changes == []
    assert len(fetched) == 1  # then backing off: each later wake is before the next attempt


# -- the compiled routes of an S3 backend (the Envoy side: tests/test_e2e_cloud_attacks.py)


def _routes(service: str) -> list[route_components_pb2.Route]:
    backend = (
        "kind: Backend\nname: a\nhosts: [a.local]\nendpoints: [{address: 127.0.0.1, port: 1}]\n"
        f"aws: {{service: {service}, region: eu-west-1, role_arn: 'arn:aws:iam::123456789012:role/r'}}\n"
    )
    gateway = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [a]\n"
    role = "kind: Role\nname: r\nbackend: a\nrules: [{methods: [GET, PUT], paths: ['/bucket/**']}]\n"
    binding = "kind: Binding\nname: b\nissuer: gitlab\nroles: [r]\nsubjects: [{project: 42}]\n"
    issuer = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
    inventory = "groups: [{id: 1, path: g}]\nprojects: [{id: 42, path: g/p, namespace_id: 1}]\n"
    files = {"p.yaml": "---\n".join([issuer + "inventory: inv.yaml\n", backend, gateway, role, binding])}
    policy = parse_policy(files | {"inv.yaml": inventory})
    compiled = compile_policy(policy, keys={"gitlab": '{"keys": []}'})
    ((_, raw),) = compiled["gw"].resources[ROUTE]
    config = route_pb2.RouteConfiguration.FromString(raw)
    (host,) = config.virtual_hosts
    return list(host.routes)


def test_an_s3_backend_refuses_copy_sources_before_any_other_route() -> None:
    routes = _routes("s3")
    refused = [r for r in routes if r.name == "a-aws-copy-refused"]
    assert len(refused) == 1 and routes.index(refused[0]) == len(routes) - 2  # just before the default route
    (matcher,) = refused[0].match.headers
    assert (matcher.name, matcher.present_match, refused[0].direct_response.status) == (COPY_SOURCE_HEADER, True, 403)
    assert not [r for r in _routes("sqs") if r.name.endswith("-copy-refused")]  # an S3 header only


# -- a policy MR swapping the identity a backend is sent upstream as


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("example", "file", "old", "new"),
    [
        ("gcp-storage", "backends.yaml", "address: 127.0.0.1, port: 8443", "address: 203.0.113.6, port: 443"),
        ("aws-s3", "backend.yaml", "{address: 127.0.0.1, port: 9000}", "{address: 127.0.0.2, port: 9000}"),
    ],
)
def test_diff_and_the_mr_check_say_when_a_cloud_backends_credential_goes_to_another_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], example: str, file: str, old: str, new: str
) -> None:
    """The identity's settings are compared (tests/test_policy_diff_cloud.py); before, an MR keeping them and
    moving the backend's endpoint printed only a resource count and exited 0 ("access unchanged"), while every
    allowed request's credential (a Bearer token; a SigV4 signature with its session token) would go to the new
    address."""
    before, after = tmp_path / "before", tmp_path / "after"
    shutil.copytree(EXAMPLES / example, before)
    shutil.copytree(EXAMPLES / example, after)
    text = (after / file).read_text()
    assert old in text
    (after / file).write_text(text.replace(old, new, 1))
    assert main(["diff", str(before), str(after)]) == 1
    out = capsys.readouterr().out
    assert "cloud destination: " in out and new.split(", port")[0].removeprefix("{").removeprefix("address: ") in out
    assert main(["diff", "--json", str(before), str(after)]) == 1
    (backend,) = json.loads(capsys.readouterr().out)["backends"]
    assert [c["setting"] for c in backend["cloud"]] == ["destination"]
    assert main(["diff", str(before), str(before)]) == 0


class Trickle:
    """An endpoint that answers a status line, then one byte every `every` seconds, never finishing."""

    def __init__(self, every: float = 0.2) -> None:
        self._server = socket.socket()
        self._server.bind((LOOPBACK, 0))
        self._server.listen(8)
        self.url = f"http://{LOOPBACK}:{self._server.getsockname()[1]}"
        self._every = every
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 1000000\r\n\r\n")
            while not self._stop.wait(self._every):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for thread in self._threads:
            thread.join(5)


def test_a_trickling_sts_cannot_hold_the_refresher_past_its_deadline() -> None:
    """Before: botocore's timeout bounds each read, not the call: a byte every 0.2 s held it as long as the
    endpoint went on (the refresher's thread, which also withdraws an expired credential, with it)."""
    trickle = Trickle()
    try:
        sts = Sts(region=REGION, endpoint_url=trickle.url, timeout_seconds=0.5, deadline_seconds=1.5)
        started = time.monotonic()
        with pytest.raises(StsError) as late:
            _Unsigned(sts).fetch()
        assert late.value.code == "DeadlineExceeded" and time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(StsError) as again:  # the first call is still held: no second thread is left behind
            _Unsigned(sts).fetch()
        assert again.value.code == "PreviousCallStillHeld" and time.monotonic() - started < 0.5
    finally:
        trickle.close()


def test_an_sts_answer_that_is_no_xml_is_an_unavailable_sts_not_a_crash() -> None:
    with Hostile(b"<<<not xml" * 1000) as hostile, pytest.raises(StsError) as bad:
        _Unsigned(Sts(region=REGION, endpoint_url=hostile.url)).fetch()
    assert not bad.value.refused and "not xml" not in str(bad.value)
