"""The invalidation broadcast: payload format, strict parser and chunking."""

from __future__ import annotations

import itertools
import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetcache.definitions.setup import SEED_INVALIDATED_CHANNEL
from fleetcache.notifications.broadcast import Invalidation, parse_invalidation
from fleetcache.stores.payloads import (
    INVALIDATED_CHANNEL,
    invalidation_payloads,
    is_sendable,
    new_origin,
)

# Names as they come: URLs, but also any text a store accepts, non-ASCII included (no NUL
# and no lone surrogate: no store holds those, and the parser refuses them).
wire_alphabet = st.characters(codec="utf-8", exclude_characters="\x00")
names_strategy = st.text(alphabet=wire_alphabet, min_size=1, max_size=40)
namespaces_strategy = st.text(alphabet=wire_alphabet, min_size=1, max_size=60)
origins_strategy = st.one_of(st.none(), st.text(alphabet="0123456789abcdefé✓", min_size=1))


def size(payload: str) -> int:
    """A payload's size as Postgres counts it: UTF-8 bytes."""
    return len(payload.encode())


def names_of(payloads: list[str]) -> list[str]:
    """Every name carried by a list of names payloads, in order."""
    out: list[str] = []
    for payload in payloads:
        parsed = parse_invalidation(payload)
        assert parsed is not None
        assert parsed.kind == "names"
        out.extend(parsed.names)
    return out


# ------------------------------------------------------------------ exact encodings


def test_channel_constants() -> None:
    """The generic channel is prefixed and versioned; the seed's stays available."""
    assert INVALIDATED_CHANNEL == "fleetcache_invalidated_v1"
    assert SEED_INVALIDATED_CHANNEL == "module_cache_invalidated"


def test_names_payload_is_compact_json_with_keys_in_order() -> None:
    """A names payload (wire kind "module") is compact JSON, keys k, r, m, o in that
    order, non-ASCII unescaped; without an origin there is no o."""
    assert invalidation_payloads("https://r/", ["a.gts", "é✓"], origin="0f") == [
        '{"k":"module","r":"https://r/","m":["a.gts","é✓"],"o":"0f"}'
    ]
    assert invalidation_payloads("ns", ["a"]) == ['{"k":"module","r":"ns","m":["a"]}']


def test_namespace_and_everything_payloads_are_exact() -> None:
    """The payloads for a whole namespace and for everything have exactly the documented
    form."""
    assert (
        invalidation_payloads("https://r/ü", origin="ab")[0]
        == '{"k":"realm","r":"https://r/ü","o":"ab"}'
    )
    assert invalidation_payloads(None, origin="ab")[0] == '{"k":"global","o":"ab"}'
    assert invalidation_payloads("ns")[0] == '{"k":"realm","r":"ns"}'
    assert invalidation_payloads(None)[0] == '{"k":"global"}'


def test_no_names_means_no_payloads() -> None:
    """Invalidating no names produces no payload (an empty 'm' is not a valid payload)."""
    assert invalidation_payloads("ns", [], origin="ab") == []


def test_encoded_payloads_match_json_dumps() -> None:
    """The hand-assembled payload equals json.dumps of the same object."""
    names = ['quote"d', "back\\slash", "ctl\x01", "tab\t", "日本"]
    (payload,) = invalidation_payloads("ns", names, origin='o"rigin')
    expected = json.dumps(
        {"k": "module", "r": "ns", "m": names, "o": 'o"rigin'},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert payload == expected


def test_new_origins_are_short_and_distinct() -> None:
    """new_origin() gives 16 hex digits, a different one each time."""
    origins = {new_origin() for _ in range(100)}
    assert len(origins) == 100
    assert all(re.fullmatch("[0-9a-f]{16}", origin) for origin in origins)


# ------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            '{"k":"module","r":"ns","m":["a","b"],"o":"ab12"}',
            Invalidation("names", "ns", ("a", "b"), "ab12"),
        ),
        ('{"k":"realm","r":"ns","o":"ab12"}', Invalidation("namespace", "ns", origin="ab12")),
        ('{"k":"global","o":"ab12"}', Invalidation("all", origin="ab12")),
        # An older peer sends no origin: foreign to everyone.
        ('{"k":"module","r":"ns","m":["a","b"]}', Invalidation("names", "ns", ("a", "b"))),
        ('{"k":"realm","r":"ns"}', Invalidation("namespace", "ns")),
        ('{"k":"global"}', Invalidation("all")),
        (
            '{"k":"module","r":"ñ","m":["日本"],"o":"é"}',
            Invalidation("names", "ñ", ("日本",), "é"),
        ),
        # Keys are found by name, and unknown keys (a newer peer's) are ignored.
        (
            '{"o":"x","m":["a"],"r":"ns","k":"module","v":2}',
            Invalidation("names", "ns", ("a",), "x"),
        ),
        ('{"k":"global","r":"ignored","m":7}', Invalidation("all")),
        # Escapes of ordinary characters are fine.
        ('{"k":"realm","r":"\\u00e9\\ud83d\\ude00"}', Invalidation("namespace", "é😀")),
    ],
)
def test_parser_accepts_each_valid_form(payload: str, expected: Invalidation) -> None:
    """Each documented payload form parses to the matching Invalidation."""
    assert parse_invalidation(payload) == expected


MALFORMED = [
    "",
    "not json",
    "{",
    "[123]",
    "[]",
    "123",
    "null",
    '"global"',
    "{}",
    '{"k":null}',
    '{"k":["global"]}',
    '{"K":"global"}',
    '{"k":"bogus","r":"ns"}',
    '{"k":"module"}',
    '{"k":"module","r":"ns"}',
    '{"k":"module","m":["a"]}',
    '{"k":"module","r":"","m":["a"]}',
    '{"k":"module","r":1,"m":["a"]}',
    '{"k":"module","r":"ns","m":[]}',
    '{"k":"module","r":"ns","m":"a"}',
    '{"k":"module","r":"ns","m":[""]}',
    '{"k":"module","r":"ns","m":["a",""]}',
    '{"k":"module","r":"ns","m":[1]}',
    '{"k":"module","r":"ns","m":["a",null]}',
    '{"k":"module","r":"ns","m":{"a":1}}',
    '{"k":"realm"}',
    '{"k":"realm","r":""}',
    '{"k":"realm","r":null}',
    '{"k":"realm","r":["ns"]}',
    # The origin, when present, is a non-empty string.
    '{"k":"global","o":""}',
    '{"k":"global","o":null}',
    '{"k":"global","o":7}',
    '{"k":"realm","r":"ns","o":["a"]}',
    # Escapes of NUL and of lone surrogates: no store holds such a key.
    '{"k":"realm","r":"n\\u0000s"}',
    '{"k":"module","r":"ns","m":["a","\\u0000"]}',
    '{"k":"module","r":"ns","m":["\\ud800"]}',
    '{"k":"realm","r":"\\udfff"}',
    '{"k":"global","o":"\\ud83d"}',
    # Hostile shapes: nesting too deep for the parser, nesting where a name belongs,
    # integers past Python's digit limit, more than any NOTIFY can carry.
    "[" * 7999,
    '{"k":"module","r":"ns","m":[' + "[" * 3000 + "]" * 3000 + "]}",
    '{"k":"global","x":' + "9" * 5000 + "}",
    '{"k":"global","pad":"' + "x" * 8000 + '"}',
    "[" * 100_000,
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_parser_rejects_malformed_payloads_with_a_warning(
    payload: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed payload returns None and logs one warning, never raising."""
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        assert parse_invalidation(payload) is None
    warnings = [r for r in caplog.records if r.name == "fleetcache.notifications"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert len(warnings[0].getMessage()) < 1000  # a huge payload is not logged in full


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
hostile_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)


@given(
    payload=st.one_of(
        hostile_text,
        json_values.map(json.dumps),
        st.fixed_dictionaries(
            {"k": st.sampled_from(["module", "realm", "global"]) | st.text(max_size=3)},
            optional={"r": json_values, "m": json_values, "o": json_values},
        ).map(json.dumps),
    )
)
def test_parser_never_raises_and_returns_only_sendable_strings(payload: str) -> None:
    """Whatever it is given, the parser returns None or an Invalidation whose namespace,
    names and origin a store and a connection could carry."""
    parsed = parse_invalidation(payload)
    if parsed is not None:
        strings = [*parsed.names, parsed.namespace or "x", parsed.origin or "x"]
        assert all(is_sendable(s) for s in strings)


# ------------------------------------------------------------------ properties


@given(
    namespace=namespaces_strategy,
    names=st.lists(names_strategy, min_size=1, max_size=30),
    origin=origins_strategy,
)
def test_encode_then_parse_round_trips(
    namespace: str, names: list[str], origin: str | None
) -> None:
    """Every encoded payload parses back to exactly what was encoded, origin included."""
    payloads = invalidation_payloads(namespace, names, origin=origin)
    assert len(payloads) == 1  # these lists fit one 7000-byte payload
    assert parse_invalidation(payloads[0]) == Invalidation("names", namespace, tuple(names), origin)
    assert parse_invalidation(invalidation_payloads(namespace, origin=origin)[0]) == Invalidation(
        "namespace", namespace, origin=origin
    )
    assert parse_invalidation(invalidation_payloads(None, origin=origin)[0]) == Invalidation(
        "all", origin=origin
    )


@given(
    namespace=namespaces_strategy,
    names=st.lists(names_strategy, max_size=60),
    origin=origins_strategy,
    budget=st.integers(min_value=1, max_value=400),
)
def test_chunks_stay_under_budget_in_order_without_loss_or_duplicates(
    namespace: str, names: list[str], origin: str | None, budget: int
) -> None:
    """Chunking keeps each payload, origin included, under the byte budget, keeps the
    order, and loses or repeats no name; chunks are full. When a name cannot fit alone the
    announcement is the namespace's payload, and when that cannot fit, the one for
    everything."""
    payloads = invalidation_payloads(namespace, names, origin=origin, budget=budget)
    whole = invalidation_payloads(namespace, origin=origin)[0]
    if size(whole) >= budget:
        assert payloads == [invalidation_payloads(None, origin=origin)[0]]
        return
    (alone,) = invalidation_payloads(namespace, ["x"], origin=origin, budget=10**9)
    fixed = size(alone) - len('"x"')
    if any(fixed + size(json.dumps(n, ensure_ascii=False)) >= budget for n in names):
        assert payloads == [whole]
        return
    assert names_of(payloads) == names
    for payload in payloads:
        parsed = parse_invalidation(payload)
        assert parsed is not None
        assert (parsed.namespace, parsed.origin) == (namespace, origin)
        assert size(payload) < budget
    # Greedy: the next chunk's first name would not have fitted in the previous chunk.
    for before, after in itertools.pairwise(payloads):
        first, rest = parse_invalidation(before), parse_invalidation(after)
        assert first is not None
        assert rest is not None
        (merged,) = invalidation_payloads(
            namespace, [*first.names, rest.names[0]], origin=origin, budget=10**9
        )
        assert size(merged) >= budget


@given(names=st.lists(st.text(alphabet="é✓日a", min_size=1, max_size=300), min_size=1, max_size=80))
def test_default_budget_chunks_multibyte_names_under_7000_bytes(names: list[str]) -> None:
    """With the default budget, multi-byte names are chunked by bytes, not characters,
    with an origin counted."""
    origin = new_origin()
    payloads = invalidation_payloads("https://realm.example/ü/", names, origin=origin)
    assert names_of(payloads) == names
    assert all(size(p) < 7000 for p in payloads)
    assert all(p.endswith(f',"o":"{origin}"}}') for p in payloads)


def test_a_name_that_cannot_travel_makes_the_namespace_payload() -> None:
    """A name too big for a payload of its own, empty, or holding NUL or a lone surrogate
    turns the whole announcement into the namespace's payload (never under-reported, and
    never a payload Postgres or a peer would refuse); a namespace too big for its payload
    turns it into the one for everything."""
    whole = invalidation_payloads("ns", origin="o")[0]
    for bad in ("x" * 500, "", "nul\x00", "a\ud800"):
        assert invalidation_payloads("ns", ["a", bad, "c"], origin="o", budget=100) == [whole]
    assert invalidation_payloads("n" * 200, ["a"], origin="o", budget=100) == [
        invalidation_payloads(None, origin="o")[0]
    ]
    assert invalidation_payloads("\x00")[0] == invalidation_payloads(None)[0]


def test_many_names_need_several_payloads_at_the_default_budget() -> None:
    """Thousands of URLs are split into several payloads, each under 7000 bytes."""
    names = [f"https://realm.example/dir/module-{i:05d}.gts" for i in range(2000)]
    payloads = invalidation_payloads("https://realm.example/", names, origin=new_origin())
    assert len(payloads) > 10
    assert all(size(p) < 7000 for p in payloads)
    assert names_of(payloads) == names
