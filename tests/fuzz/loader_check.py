"""The loader's contract, checked on one input: a Policy, or errors that each point at a real line; in bounded
time and memory; never any other exception."""

from __future__ import annotations

import re
import time
import tracemalloc
from collections.abc import Callable, Mapping

from hypothesis import reject

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.policy import Policy
from tests.fuzz.figures import peak
from tests.fuzz.known import AVOID_KNOWN, avoid_known

# Bounds on one load. Time: 2 s for a policy file of up to 1 MiB, plus 0.5 s per further MiB (mutations that
# duplicate huge strings build inputs of up to ~12 MiB). Memory: a fixed allowance plus a multiple of the input.
# In a 20,000-case run (docs/fuzzing.md) the slowest load took 1.9 s and the largest peak was 12.6 MiB.
TIME_BOUND_S = 2.0
TIME_PER_EXTRA_MIB_S = 0.5
MEMORY_FIXED = 32 << 20
MEMORY_PER_INPUT_BYTE = 40

# PyYAML counts \r\n, \r, \n, NEL, LS and PS as line breaks (YAML 1.1); an error may point at the line after the
# last break (end of input), hence the + 1.
_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
_SOURCE = re.compile(r"Source\(file='((?:[^'\\]|\\.)*)', line=(-?\d+)\)")


def yaml_lines(text: str) -> int:
    return len(_BREAKS.findall(text)) + 1


def measured(load: Callable[[], Policy], size: int) -> tuple[Policy | None, list[PolicyError]]:
    """Run one load; check its time and peak memory; return what it gave. Anything but PolicyInvalid escapes.

    `load` is a cold `parse_policy`: each case pays its own parse, and nothing piles up fuzz texts."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        policy, errors = load(), []
    except PolicyInvalid as invalid:
        policy, errors = None, invalid.errors
    except Exception as error:
        avoid_known(error)
        raise
    finally:
        elapsed = time.perf_counter() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    peak("loader seconds per load", elapsed)
    peak("loader peak MiB per load", peak_bytes / 2**20)
    peak("loader input MiB", size / 2**20)
    time_bound = TIME_BOUND_S + TIME_PER_EXTRA_MIB_S * max(0.0, size / 2**20 - 1)
    assert elapsed < time_bound, f"one load took {elapsed:.2f} s (bound {time_bound:.1f} s, input {size} bytes)"
    bound = MEMORY_FIXED + MEMORY_PER_INPUT_BYTE * size
    assert peak_bytes < bound, f"one load peaked at {peak_bytes >> 20} MiB (bound {bound >> 20}, input {size} bytes)"
    return policy, errors


def check_outcome(policy: Policy | None, errors: list[PolicyError], texts: Mapping[str, str]) -> None:
    """Exactly one of a policy or errors; every error and every element source names a file and a line in it."""
    assert (policy is None) == bool(errors), "a load gives a policy or errors, never both nor neither"
    for error in errors:
        assert error.file in texts, f"error names a file that was not loaded: {error}"
        if AVOID_KNOWN and error.line == yaml_lines(texts[error.file]) + 1:
            reject()  # finding F4: an end-of-input syntax error points one line past a last line without newline
        assert 1 <= error.line <= yaml_lines(texts[error.file]), f"error line outside the file: {error}"
        assert error.message, f"error without a message: {error!r}"
    if policy is not None:
        check_documented_forms(policy)
        try:
            printed = repr(policy)
        except ValueError as error:  # finding F3: a hex id past 4,300 decimal digits; str() of it raises
            avoid_known(error)
            raise AssertionError(f"a valid policy holds a value the compiler cannot print: {error}") from error
        for file, line in _SOURCE.findall(printed):
            assert file in texts, f"policy element from a file that was not loaded: {file}"
            assert 1 <= int(line) <= yaml_lines(texts[file]), f"policy element at {file}:{line}, outside the file"


_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
_DIGITS = re.compile(r"[0-9]+")


def check_documented_forms(policy: Policy) -> None:
    """What the README promises of a valid policy, checked on the model itself (whole-string matches)."""
    for element in (*policy.issuers, *policy.backends, *policy.roles, *policy.gateways, *policy.bindings):
        if AVOID_KNOWN and element.name.endswith("\n"):
            reject()  # finding F5: `$` in the loader's patterns lets one trailing newline through
        assert _NAME.fullmatch(element.name), f"{type(element).__name__} name {element.name!r} is not a valid name"
    for backend in policy.backends:
        for host in backend.hosts:
            if AVOID_KNOWN and host.endswith("\n"):
                reject()
            assert _HOST.fullmatch(host), f"backend {backend.name!r} host {host!r} is not a valid host name"


def load_texts(texts: Mapping[str, str], load: Callable[[], Policy]) -> Policy | None:
    policy, errors = measured(load, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts.values()))
    check_outcome(policy, errors, texts)
    return policy


def without_locations(policy: Policy) -> str:
    """The model with every source location blanked: what two spellings of one policy must share."""
    return _SOURCE.sub("Source()", repr(policy))
