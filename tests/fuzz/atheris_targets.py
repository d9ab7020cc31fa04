"""Coverage-guided fuzzing with atheris (libFuzzer), for `make fuzz`: the same four targets and properties as the
hypothesis harnesses, driven by raw bytes that atheris mutates towards new branches of controlplane's code.

    python -m tests.fuzz.atheris_targets TARGET [--runs N] [--seconds S] [--artifacts DIR]

Unlike a plain libFuzzer run, a crash does not end the run: each distinct crash (exception type and the
controlplane frame it came from) is written once to DIR and counted, so one run reports every crash it reaches.
It ends after N inputs or S seconds and prints `atheris TARGET: R runs, C distinct crashes (K known)`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

import atheris
from hypothesis.errors import UnsatisfiedAssumption

with atheris.instrument_imports(include=["controlplane"]):
    from controlplane.admin.http import BadQuery, parse_status_query
    from controlplane.credentials.http import MAX_FIELDS
    from controlplane.model.errors import PolicyInvalid
    from controlplane.model.loader import parse_policy
    from controlplane.sources.gitlab_events import Malformed, parse_event

import contextlib

from tests.fuzz.exchange_harness import make_exchange
from tests.fuzz.known import is_known
from tests.fuzz.loader_check import check_outcome
from tests.fuzz.policy_gen import SEED_BYTES
from tests.fuzz.webhook_contract import PAYLOADS, check_parse


def loader(data: bytes) -> None:
    try:
        text = data.decode("utf-8")  # as read_policy_dir reads a file: not UTF-8 is a located error there
    except UnicodeDecodeError:
        return
    try:
        policy, errors = parse_policy({"p.yaml": text}), []
    except PolicyInvalid as invalid:
        policy, errors = None, invalid.errors
    check_outcome(policy, errors, {"p.yaml": text})


def webhook(data: bytes) -> None:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return  # the receiver answers 400 for these; its own harness checks that over HTTP
    check_parse(payload)
    with contextlib.suppress(Malformed):
        parse_event(payload)


_EXCHANGE = None


def exchange(data: bytes) -> None:
    global _EXCHANGE
    if _EXCHANGE is None:
        _EXCHANGE = make_exchange(Path(tempfile.mkdtemp(prefix="fuzz-keys-")))
    try:
        pairs = parse_qsl(data.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return  # the endpoint answers 400 (its harness checks that)
    result = asyncio.run(_EXCHANGE.exchange.exchange(dict(pairs)))
    assert not result.granted, "a credential for bytes that hold no token signed by the issuer"


def status(data: bytes) -> None:
    try:
        query = dict(parse_qsl(data.decode("utf-8", "surrogateescape"), keep_blank_values=True))
    except ValueError:
        return
    with contextlib.suppress(BadQuery):
        parse_status_query(query)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "loader": loader,
    "webhook": webhook,
    "exchange": exchange,
    "status": status,
}
SEEDS: dict[str, list[bytes]] = {
    "loader": SEED_BYTES,
    "webhook": [json.dumps(p).encode() for p in PAYLOADS],
    "exchange": [
        b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=a.b.c"
        b"&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=reports-api"
    ],
    "status": [b"group=g1&limit=10&offset=0&nacked=1&protocol=sotw&summary=0&node=n-*"],
}


class Run:
    def __init__(self, name: str, runs: int, seconds: float, artifacts: Path) -> None:
        self.name, self.target = name, TARGETS[name]
        self.runs, self.deadline = runs, time.monotonic() + seconds
        self.artifacts = artifacts
        self.done = 0
        self.crashes: dict[str, bool] = {}  # signature -> known
        self.started = time.monotonic()

    def __call__(self, data: bytes) -> None:
        self.done += 1
        try:
            self.target(data)
        except UnsatisfiedAssumption:
            pass  # FUZZ_AVOID_KNOWN=1: the harness recognised a known finding and discarded the input
        except Exception as error:
            self._crash(data, error)
        if self.done >= self.runs or time.monotonic() > self.deadline:
            self.finish()

    def _crash(self, data: bytes, error: Exception) -> None:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "/controlplane/" in f.filename]
        where = f"{frames[-1].filename.split('/controlplane/')[-1]}:{frames[-1].lineno}" if frames else "harness"
        signature = f"{type(error).__name__} at {where}"
        if isinstance(error, AssertionError):  # a property of the harness failed: tell them apart by what it says
            signature += f" ({str(error).split(':')[0][:60]})"
        if signature in self.crashes:
            return
        self.crashes[signature] = is_known(error) or "error line outside the file" in str(error)  # F4
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{self.name}-crash-{hashlib.sha1(data).hexdigest()[:12]}"
        path.write_bytes(data)
        message = str(error).splitlines()[0][:120] if str(error) else ""
        print(f"atheris {self.name}: crash {signature}: {message} (input {path})", flush=True)

    def finish(self) -> None:
        known = sum(self.crashes.values())
        elapsed = time.monotonic() - self.started
        for signature, is_old in sorted(self.crashes.items()):
            print(f"atheris {self.name}:   {'known' if is_old else 'NEW  '} {signature}", flush=True)
        found = f"{len(self.crashes)} distinct crashes ({known} known)"
        print(f"atheris {self.name}: {self.done} runs in {elapsed:.0f} s, {found}", flush=True)
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--artifacts", type=Path, default=Path(".fuzz"))
    options = parser.parse_args()
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-corpus-{options.target}-"))
    for i, seed in enumerate(SEEDS[options.target]):
        (corpus / f"seed-{i}").write_bytes(seed)
    run = Run(options.target, options.runs, options.seconds, options.artifacts)
    sys.setrecursionlimit(1000)  # the interpreter's default, whatever the harness imports did
    atheris.Setup([sys.argv[0], "-max_len=65536", "-rss_limit_mb=2048", str(corpus)], run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
