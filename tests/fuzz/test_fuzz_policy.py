"""Fuzzing the policy loader: any bytes or any mutated document gives a Policy or located errors, in bounded time
and memory; a valid policy written in another YAML style loads to the same model."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from controlplane.model.loader import parse_policy
from controlplane.sources.policy_dir import load_policy_dir
from tests.fuzz.figures import count
from tests.fuzz.loader_check import load_texts, without_locations
from tests.fuzz.policy_gen import SEED_TREES, SEEDS, Map, deep_block, emit, mutated_bytes, mutated_tree, styles


@pytest.fixture(scope="module")
def policy_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz-policy")


@given(data=st.binary(max_size=2048) | mutated_bytes())
@example(data=b"\xff\xfe")
def test_any_bytes_load_to_a_policy_or_located_errors(policy_root: Path, data: bytes) -> None:
    """The file a platform engineer commits, as bytes, through the same reader `serve` and `validate` use."""
    count("loader: raw bytes")
    (policy_root / "policy.yaml").write_bytes(data)
    load_texts({"policy.yaml": data.decode("utf-8", "replace")}, partial(load_policy_dir, policy_root))


@st.composite
def mutated_case(draw: st.DrawFn) -> dict[str, str]:
    case = draw(st.sampled_from(sorted(SEED_TREES)))
    trees = SEED_TREES[case]
    target = draw(st.sampled_from(sorted(trees)))
    texts = dict(SEEDS[case])
    texts[target] = emit(draw(mutated_tree(trees[target])), draw(styles))
    return texts


@given(texts=mutated_case())
def test_mutated_documents_load_to_a_policy_or_located_errors(texts: dict[str, str]) -> None:
    """Wrong types, unknown and duplicate keys, anchors, tags, huge numbers and strings, deep nesting, odd unicode."""
    count("loader: mutated documents")
    load_texts(texts, partial(parse_policy, texts))


@settings(max_examples=max(200, settings().max_examples // 10))  # one number and two switches: few distinct cases
@given(depth=st.integers(10, 5000), sequences=st.booleans(), flow=st.booleans())
def test_deeply_nested_documents_are_errors_not_crashes(depth: int, sequences: bool, flow: bool) -> None:
    count("loader: deep nesting")
    if flow:
        nested = "[" * depth + "]" * depth if sequences else "{a: " * depth + "1" + "}" * depth
        text = f"kind: Role\nname: r\nbackend: b\nrules: {nested}\n"
    else:
        text = "kind: Role\nname: r\nbackend: b\nrules:\n" + deep_block(depth, sequences)
    load_texts({"role.yaml": text}, partial(parse_policy, {"role.yaml": text}))


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, Map):
        pairs = [(k, _shuffled(v, rng)) for k, v in value]
        rng.shuffle(pairs)
        return Map(pairs)
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=max(200, settings().max_examples // 4))  # three trees x styles x key orders
@given(case=st.sampled_from(sorted(SEED_TREES)), style=styles, rng=st.randoms(use_true_random=False))
def test_a_policy_rewritten_in_another_style_loads_to_the_same_model(case: str, style: Any, rng: random.Random) -> None:
    """Block or flow, quoted or plain, keys in any order: the same policy, element for element."""
    count("loader: re-emitted round trip")
    original = load_texts(SEEDS[case], partial(parse_policy, SEEDS[case]))
    assert original is not None
    texts = {name: emit(_shuffled(docs, rng), style) for name, docs in SEED_TREES[case].items()}
    rewritten = load_texts(texts, partial(parse_policy, texts))
    assert rewritten is not None, "a valid policy re-emitted became invalid"
    assert without_locations(rewritten) == without_locations(original)
