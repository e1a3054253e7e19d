"""The invalidation broadcast: payload format, strict parser, chunking and the publisher."""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import AsyncIterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from fleetcache.definitions.setup import SEED_INVALIDATED_CHANNEL
from fleetcache.errors import ConfigurationError
from fleetcache.notifications import (
    INVALIDATED_CHANNEL,
    Invalidation,
    PostgresInvalidationPublisher,
    encode_global_payload,
    encode_module_payloads,
    encode_realm_payload,
    is_sendable,
    new_origin,
    parse_invalidation,
)

WAIT = 10.0  # generous bound on any wait; never an assertion about speed

Pool = AsyncConnectionPool[psycopg.AsyncConnection]

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
    """Every name carried by a list of module payloads, in order."""
    out: list[str] = []
    for payload in payloads:
        parsed = parse_invalidation(payload)
        assert parsed is not None
        assert parsed.kind == "module"
        out.extend(parsed.names)
    return out


# ------------------------------------------------------------------ exact encodings


def test_channel_constants() -> None:
    """The generic channel is prefixed and versioned; the seed's stays available."""
    assert INVALIDATED_CHANNEL == "fleetcache_invalidated_v1"
    assert SEED_INVALIDATED_CHANNEL == "module_cache_invalidated"


def test_module_payload_is_compact_json_with_keys_in_order() -> None:
    """A module payload is compact JSON, keys k, r, m, o in that order, non-ASCII
    unescaped; without an origin there is no o."""
    assert encode_module_payloads("https://r/", ["a.gts", "é✓"], origin="0f") == [
        '{"k":"module","r":"https://r/","m":["a.gts","é✓"],"o":"0f"}'
    ]
    assert encode_module_payloads("ns", ["a"]) == ['{"k":"module","r":"ns","m":["a"]}']


def test_realm_and_global_payloads_are_exact() -> None:
    """The realm and global payloads have exactly the documented form."""
    assert (
        encode_realm_payload("https://r/ü", origin="ab")
        == '{"k":"realm","r":"https://r/ü","o":"ab"}'
    )
    assert encode_global_payload(origin="ab") == '{"k":"global","o":"ab"}'
    assert encode_realm_payload("ns") == '{"k":"realm","r":"ns"}'
    assert encode_global_payload() == '{"k":"global"}'


def test_no_names_means_no_payloads() -> None:
    """Invalidating no names produces no payload (an empty 'm' is not a valid payload)."""
    assert encode_module_payloads("ns", [], origin="ab") == []


def test_encoded_payloads_match_json_dumps() -> None:
    """The hand-assembled payload equals json.dumps of the same object."""
    names = ['quote"d', "back\\slash", "ctl\x01", "tab\t", "日本"]
    (payload,) = encode_module_payloads("ns", names, origin='o"rigin')
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
            Invalidation("module", "ns", ("a", "b"), "ab12"),
        ),
        ('{"k":"realm","r":"ns","o":"ab12"}', Invalidation("realm", "ns", origin="ab12")),
        ('{"k":"global","o":"ab12"}', Invalidation("global", origin="ab12")),
        # An older peer sends no origin: foreign to everyone.
        ('{"k":"module","r":"ns","m":["a","b"]}', Invalidation("module", "ns", ("a", "b"))),
        ('{"k":"realm","r":"ns"}', Invalidation("realm", "ns")),
        ('{"k":"global"}', Invalidation("global")),
        (
            '{"k":"module","r":"ñ","m":["日本"],"o":"é"}',
            Invalidation("module", "ñ", ("日本",), "é"),
        ),
        # Keys are found by name, and unknown keys (a newer peer's) are ignored.
        (
            '{"o":"x","m":["a"],"r":"ns","k":"module","v":2}',
            Invalidation("module", "ns", ("a",), "x"),
        ),
        ('{"k":"global","r":"ignored","m":7}', Invalidation("global")),
        # Escapes of ordinary characters are fine.
        ('{"k":"realm","r":"\\u00e9\\ud83d\\ude00"}', Invalidation("realm", "é😀")),
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
    payloads = encode_module_payloads(namespace, names, origin=origin)
    assert len(payloads) == 1  # these lists fit one 7000-byte payload
    assert parse_invalidation(payloads[0]) == Invalidation(
        "module", namespace, tuple(names), origin
    )
    assert parse_invalidation(encode_realm_payload(namespace, origin=origin)) == Invalidation(
        "realm", namespace, origin=origin
    )
    assert parse_invalidation(encode_global_payload(origin=origin)) == Invalidation(
        "global", origin=origin
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
    announcement is the realm payload, and when that cannot fit, the global one."""
    payloads = encode_module_payloads(namespace, names, origin=origin, budget=budget)
    realm = encode_realm_payload(namespace, origin=origin)
    if size(realm) >= budget:
        assert payloads == [encode_global_payload(origin=origin)]
        return
    (alone,) = encode_module_payloads(namespace, ["x"], origin=origin, budget=10**9)
    fixed = size(alone) - len('"x"')
    if any(fixed + size(json.dumps(n, ensure_ascii=False)) >= budget for n in names):
        assert payloads == [realm]
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
        (merged,) = encode_module_payloads(
            namespace, [*first.names, rest.names[0]], origin=origin, budget=10**9
        )
        assert size(merged) >= budget


@given(names=st.lists(st.text(alphabet="é✓日a", min_size=1, max_size=300), min_size=1, max_size=80))
def test_default_budget_chunks_multibyte_names_under_7000_bytes(names: list[str]) -> None:
    """With the default budget, multi-byte names are chunked by bytes, not characters,
    with a publisher's origin counted."""
    origin = new_origin()
    payloads = encode_module_payloads("https://realm.example/ü/", names, origin=origin)
    assert names_of(payloads) == names
    assert all(size(p) < 7000 for p in payloads)
    assert all(p.endswith(f',"o":"{origin}"}}') for p in payloads)


def test_a_name_that_cannot_travel_makes_the_realm_payload() -> None:
    """A name too big for a payload of its own, empty, or holding NUL or a lone surrogate
    turns the whole announcement into the realm payload (never under-reported, and never
    a payload Postgres or a peer would refuse); a namespace too big for the realm payload
    turns it into the global one."""
    realm = encode_realm_payload("ns", origin="o")
    for bad in ("x" * 500, "", "nul\x00", "a\ud800"):
        assert encode_module_payloads("ns", ["a", bad, "c"], origin="o", budget=100) == [realm]
    assert encode_module_payloads("n" * 200, ["a"], origin="o", budget=100) == [
        encode_global_payload(origin="o")
    ]
    assert encode_realm_payload("\x00") == encode_global_payload()


def test_many_names_need_several_payloads_at_the_default_budget() -> None:
    """Thousands of URLs are split into several payloads, each under 7000 bytes."""
    names = [f"https://realm.example/dir/module-{i:05d}.gts" for i in range(2000)]
    payloads = encode_module_payloads("https://realm.example/", names, origin=new_origin())
    assert len(payloads) > 10
    assert all(size(p) < 7000 for p in payloads)
    assert names_of(payloads) == names


# ------------------------------------------------------------------ publisher (Postgres)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    """An open pool of autocommit connections to the test database."""
    made: Pool = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await made.open(wait=True)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def listening(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A plain connection LISTENing on the invalidated channel."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await conn.execute(f"LISTEN {INVALIDATED_CHANNEL}")
    try:
        yield conn
    finally:
        await conn.close()


async def received(conn: psycopg.AsyncConnection, count: int) -> list[str]:
    """Collect ``count`` payloads from a LISTENing connection (bounded wait)."""
    got: list[str] = []
    async for notify in conn.notifies(timeout=WAIT, stop_after=count):
        assert notify.channel == INVALIDATED_CHANNEL
        got.append(notify.payload)
    return got


async def nothing_more(conn: psycopg.AsyncConnection) -> list[str]:
    """Whatever else arrives within a short grace period (expected: nothing)."""
    return [n.payload async for n in conn.notifies(timeout=0.3)]


def publisher_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The notifications layer's log records."""
    return [r for r in caplog.records if r.name == "fleetcache.notifications"]


def test_publisher_origin_is_random_unless_given() -> None:
    """Each publisher has its own random origin by default, or the one it was given."""
    fake_pool: Pool = AsyncConnectionPool("dbname=x", open=False)
    first = PostgresInvalidationPublisher(fake_pool)
    second = PostgresInvalidationPublisher(fake_pool)
    assert first.origin != second.origin
    assert re.fullmatch("[0-9a-f]{16}", first.origin)
    assert PostgresInvalidationPublisher(fake_pool, origin="node-7").origin == "node-7"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "x" * 65},
        {"origin": "nul\x00"},
        {"origin": "\ud800"},
        {"budget": 0},
        {"budget": 9000},
        {"channel": ""},
        {"channel": "c" * 64},
    ],
)
def test_publisher_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    """An origin that is empty, long or unsendable, a budget outside 1..8000 and a channel
    Postgres cannot notify on are refused when the publisher is built."""
    fake_pool: Pool = AsyncConnectionPool("dbname=x", open=False)
    with pytest.raises(ConfigurationError):
        PostgresInvalidationPublisher(fake_pool, **kwargs)  # type: ignore[arg-type]


@pytest.mark.postgres
async def test_publisher_sends_payloads_as_encoded(
    pool: Pool, listening: psycopg.AsyncConnection
) -> None:
    """Each publisher method sends exactly the encoded payloads with its origin, in order."""
    publisher = PostgresInvalidationPublisher(pool, budget=200)
    origin = publisher.origin
    names = [f"https://r/mod-{i}-ü.gts" for i in range(20)]
    module_payloads = encode_module_payloads("https://r/", names, origin=origin, budget=200)
    assert len(module_payloads) > 1
    await publisher.names_invalidated("https://r/", names)
    await publisher.namespace_cleared("https://r/")
    await publisher.all_cleared()
    expected = [
        *module_payloads,
        encode_realm_payload("https://r/", origin=origin),
        encode_global_payload(origin=origin),
    ]
    assert await received(listening, len(expected)) == expected


@pytest.mark.postgres
async def test_publisher_sends_the_realm_payload_for_a_name_too_big_to_travel(
    pool: Pool, listening: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """A name no payload can carry (9000 bytes) makes the publisher send the realm
    payload, which Postgres accepts: nothing refused, nothing logged."""
    publisher = PostgresInvalidationPublisher(pool, origin="o")
    huge = "h" * 9000
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        await publisher.names_invalidated("ns", ["before", huge, "after"])
    assert await received(listening, 1) == [encode_realm_payload("ns", origin="o")]
    assert await nothing_more(listening) == []
    assert publisher_warnings(caplog) == []


@pytest.mark.postgres
async def test_publisher_logs_and_survives_a_closed_pool(
    database_url: str, listening: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing on a closed pool logs one warning per payload and raises nothing."""
    closed: Pool = AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False)
    await closed.open(wait=True)
    await closed.close()
    publisher = PostgresInvalidationPublisher(closed)
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        await publisher.names_invalidated("ns", ["a"])
        await publisher.namespace_cleared("ns")
        await publisher.all_cleared()
    records = publisher_warnings(caplog)
    assert len(records) == 3
    assert all("failed" in r.getMessage() for r in records)
    assert await nothing_more(listening) == []


@pytest.mark.postgres
async def test_publisher_leaves_out_names_peers_would_refuse(
    pool: Pool, listening: psycopg.AsyncConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """Names no store can hold (empty, NUL, lone surrogate) are left out with a warning
    instead of making peers refuse the whole chunk, and nothing is raised; an unsendable
    namespace sends nothing."""
    publisher = PostgresInvalidationPublisher(pool, origin="o")
    with caplog.at_level(logging.WARNING, logger="fleetcache.notifications"):
        await publisher.names_invalidated("ns", ["a", "", "b\x00", "c\ud800", "d"])
        await publisher.names_invalidated("n\x00s", ["a"])
        await publisher.namespace_cleared("\udc00")
    (payload,) = await received(listening, 1)
    assert parse_invalidation(payload) == Invalidation("module", "ns", ("a", "d"), "o")
    assert await nothing_more(listening) == []
    assert len(publisher_warnings(caplog)) == 3


@pytest.mark.postgres
async def test_publisher_works_on_a_pool_without_autocommit(
    database_url: str, listening: psycopg.AsyncConnection
) -> None:
    """On a pool whose connections are not autocommit the NOTIFY is still committed."""
    async with AsyncConnectionPool(database_url, min_size=1, max_size=1, open=False) as tx_pool:
        publisher = PostgresInvalidationPublisher(tx_pool)
        await publisher.all_cleared()
        assert await received(listening, 1) == [encode_global_payload(origin=publisher.origin)]


@pytest.mark.postgres
async def test_publisher_uses_a_custom_channel(pool: Pool, database_url: str) -> None:
    """A publisher built with another channel (the seed's) notifies on that channel."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {SEED_INVALIDATED_CHANNEL}")
        publisher = PostgresInvalidationPublisher(pool, channel=SEED_INVALIDATED_CHANNEL)
        await publisher.all_cleared()
        notifies = [n async for n in conn.notifies(timeout=WAIT, stop_after=1)]
        assert [(n.channel, n.payload) for n in notifies] == [
            (SEED_INVALIDATED_CHANNEL, encode_global_payload(origin=publisher.origin))
        ]
