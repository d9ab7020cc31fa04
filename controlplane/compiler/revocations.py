"""The fleet-wide deny list as RBAC filter configurations, each delivered by ECDS: REVOCATION_BUCKETS sealed
buckets and one of recent revocations.

A job id's bucket is `revocation_bucket(id)` (model/credentials.py). Each bucket, and the recent list, is one RBAC
DENY filter of the gateway listener whose configuration is its own xDS resource (named like the filter,
`names.revocation_bucket_filter`, `names.REVOKED_RECENTLY_FILTER`): a revocation changes the recent list's
resource, never a route or a listener, and over Delta only that resource is sent. When the service seals the
recent ids into their buckets, the buckets they join change once (credentials/revocations.py).

A bucket's ids are matched by one RE2 regex on the `job_id` claim: RE2 runs in time linear in the claim, not in
the list's length (one principal per id was a linear scan of the list per request). Envoy's `safe_regex` is a
full match, so `123` never matches `12` or `1234` (docs/envoy-ecds.md §9). The regex groups GitLab's decimal ids
by their thousand-block prefix and the next two digits, with a character class for the last digit:
`8000012(?:0[0-35]|17[7-9])` is 8000012000..3, 8000012005, 8000012177..9. A regex over RE2's default program
size (100) needs the `re2.max_program_size.error_level` runtime key that `controlplane bootstrap` sets.

Pure: no I/O; the memo (CompilerMemo.revocation_buckets) keys each bucket's bytes by its tuple of ids, so only
the bucket that changed is re-encoded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from controlplane.compiler.claims import claim_string_principal
from controlplane.compiler.names import REVOKED_POLICY, REVOKED_RECENTLY_FILTER, revocation_bucket_filter
from controlplane.compiler.util import packed, serialized
from controlplane.model.credentials import REVOCATION_BUCKETS

RBAC_URL = "type.googleapis.com/" + rbac_filter.RBAC.DESCRIPTOR.full_name


# At most this many characters in one regex: a bucket with more ids is denied by several principals (RBAC ORs
# them), each regex far from RE2's limits. Observed on the real Envoy (tests/test_e2e_revocation_buckets.py):
# about 110,000 ids of one bucket in distinct thousand-blocks (1.2 MB of regex) are refused by RE2 itself
# ("pattern too large - compile failed", its memory budget) before Envoy's program-size limit of 1,000,000,
# and a refused bucket keeps its previous configuration: its new ids would not be denied. 200,000 characters
# is about 20,000 such ids (RE2 program ~100,000), or 18,000 consecutive ones; a busy GitLab's bucket holds a
# few thousand, so this only ever splits a list far larger than the design's 50,000.
MAX_REGEX_CHARS = 200_000


def bucket_regex(job_ids: Sequence[str]) -> str:
    """One RE2 alternation matching exactly `job_ids` (as a full match); deterministic for a sorted input."""
    return "|".join(_alternatives(job_ids))


def bucket_regexes(job_ids: Sequence[str], limit: int = MAX_REGEX_CHARS) -> list[str]:
    """Alternations of at most `limit` characters (one thousand-block's alternative is never split) that
    together match exactly `job_ids`: one for any bucket under the limit."""
    chunks: list[list[str]] = [[]]
    size = 0
    for alternative in _alternatives(job_ids):
        if chunks[-1] and size + 1 + len(alternative) > limit:
            chunks.append([])
            size = 0
        size += len(alternative) + (1 if len(chunks[-1]) else 0)
        chunks[-1].append(alternative)
    return ["|".join(chunk) for chunk in chunks if chunk]


def _alternatives(job_ids: Sequence[str]) -> list[str]:
    groups: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    others: list[str] = []
    for job in sorted(set(job_ids)):
        if job.isascii() and job.isdigit():
            groups[job[:-3]][job[-3:-1]].add(job[-1])
        else:
            others.append(_escaped(job))
    return [_block(prefix, tails) for prefix, tails in sorted(groups.items())] + others


def _block(prefix: str, tails: dict[str, set[str]]) -> str:
    """`prefix(?:mid[class]|...)`; one tail needs no group."""
    parts = [mid + _digit_class(last) for mid, last in sorted(tails.items())]
    if len(parts) == 1:
        return prefix + parts[0]
    return f"{prefix}(?:{'|'.join(parts)})"


def _digit_class(digits: set[str]) -> str:
    """`5`, `[0-35]`, `[0-9]`: runs of three or more consecutive digits as a range."""
    if len(digits) == 1:
        return next(iter(digits))
    values = sorted(int(d) for d in digits)
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = "".join(f"{r[0]}-{r[-1]}" if len(r) >= 3 else "".join(map(str, r)) for r in runs)
    return f"[{text}]"


def _escaped(job: str) -> str:
    """RE2 takes `\\` before any ASCII punctuation as that character; other characters stand for themselves.
    The empty id is `(?:)`: a bucket holding it alone would otherwise be an empty regex, which Envoy refuses
    (RegexMatcher needs at least one character: the whole bucket NACKed, its previous ids kept in force)."""
    if not job:
        return "(?:)"
    return "".join("\\" + c if c.isascii() and not c.isalnum() and c != "_" else c for c in job)


def bucket_rbac(job_ids: Sequence[str]) -> rbac_filter.RBAC:
    """DENY the bucket's jobs: one policy, any permission, the `job_id` claim matching the bucket's regex (one
    principal per `MAX_REGEX_CHARS` of it: any of them matching denies). No ids: no policy, which denies
    nothing (a DENY filter without policies lets everything through)."""
    rules = rbac_config.RBAC(action=rbac_config.RBAC.DENY)
    if job_ids:
        principals = [
            claim_string_principal("job_id", string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex)))
            for regex in bucket_regexes(job_ids)
        ]
        rules.policies[REVOKED_POLICY].CopyFrom(
            rbac_config.Policy(permissions=[rbac_config.Permission(any=True)], principals=principals)
        )
    return rbac_filter.RBAC(rules=rules)


def bucket_config_bytes(name: str, job_ids: Sequence[str]) -> bytes:
    """The serialized TypedExtensionConfig denying `job_ids`: the ECDS resource named like its filter, `name`."""
    config = extension_pb2.TypedExtensionConfig(name=name, typed_config=packed(bucket_rbac(job_ids)))
    return serialized(config)


def bucket_names() -> list[str]:
    """Every deny-list filter, in the listener's order: the sealed buckets, then the recent revocations."""
    return [*(revocation_bucket_filter(i) for i in range(REVOCATION_BUCKETS)), REVOKED_RECENTLY_FILTER]
