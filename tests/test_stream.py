"""The stream protocol and a subscriber's queue, without sockets."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.core.hub import EVENT_LIMIT, ReadingsText, RowBatch, SeriesRing, Subscriber
from collector.wire import stream
from collector.wire.stream import Matcher, StreamError, Subscribe, Subscription


def parse(text):
    return stream.parse_client_message(text, history_max=300)


def test_subscribe_defaults_and_limits():
    assert parse('{"type": "subscribe"}') == Subscribe(Subscription(("*",), ("*",), None, 300))
    msg = parse(
        '{"type": "subscribe", "devices": ["temp-*"], "metrics": ["a", "b*"], "max_rate": 2, "history": 5000}'
    )
    assert msg == Subscribe(Subscription(("temp-*",), ("a", "b*"), 2.0, 300))
    assert parse('{"type": "ping", "id": 7}') == stream.Ping(7)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("nope", "bad_json"),
        ("[]", "bad_json"),
        (b"binary", "bad_message"),
        ('{"type": 3}', "bad_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "subscribe", "devices": []}', "bad_message"),
        ('{"type": "subscribe", "devices": [1]}', "bad_message"),
        ('{"type": "subscribe", "devices": "fast-001"}', "bad_message"),  # a list, not a string
        ('{"type": "subscribe", "max_rate": 0}', "bad_message"),
        ('{"type": "subscribe", "max_rate": true}', "bad_message"),
        ('{"type": "subscribe", "history": -1}', "bad_message"),
        ('{"type": "subscribe", "devices": ["' + "x" * 200 + '"]}', "bad_message"),
    ],
)
def test_bad_client_messages(text, code):
    with pytest.raises(StreamError) as info:
        parse(text)
    assert info.value.code == code


@given(st.one_of(st.text(max_size=300), st.binary(max_size=100)))
def test_parser_only_raises_stream_error(data):
    try:
        parse(data)
    except StreamError:
        pass


def test_matcher_globs():
    m = Matcher(Subscription(("temp-*", "hum-1"), ("t*",)))
    assert m.device("temp-9") and m.device("hum-1") and not m.device("hum-2")
    assert m.metric("temperature") and not m.metric("humidity")
    assert not m.everything and Matcher(Subscription()).everything


def take(sub, now=0.0):
    """What the sender would send, as dicts (without the per-connection seq)."""
    out = []
    for m in sub.take(now):
        if isinstance(m, ReadingsText):
            m = json.loads(stream.readings_text(m.fragments, 0))
            del m["seq"]
        out.append(m)
    return out


def subscriber(limit=10, subscription=None):
    sub = Subscriber(1, "test", limit, 1000, 0.0)
    sub.matcher = Matcher(subscription or Subscription())
    return sub


def rows(device, n, start=0):
    return [(device, "t", float(i), float(i)) for i in range(start, start + n)]


def test_everything_queued_goes_out_in_one_message_in_order():
    sub = subscriber()
    sub.offer_rows(rows("a", 3))
    sub.offer_message({"type": "device", "device": "a", "online": False}, "a")
    sub.offer_rows(rows("b", 2))
    out = take(sub, 0.0)
    assert [m["type"] for m in out] == ["readings", "device", "readings"]
    assert [r[0] for r in out[0]["readings"]] == ["a"] * 3 and len(out[2]["readings"]) == 2
    assert take(sub, 0.0) == []


def test_a_full_queue_coalesces_to_the_latest_value_per_series_and_counts_the_rest():
    sub = subscriber(limit=10)
    sub.offer_rows(rows("a", 8))
    sub.offer_rows([("b", "t", 0.0, 0.0), ("b", "h", 0.0, 1.0)])
    assert sub.coalesced is None and sub.queued == 10
    sub.offer_rows(rows("a", 5, start=8))  # over the limit: coalesce
    assert sub.queued == 3  # a/t, b/t, b/h
    out = take(sub, 0.0)
    assert out[0] == {"type": "missed", "count": 12, "total": 12}
    assert out[1]["readings"] == [
        ["a", "t", 12.0, 12.0],
        ["b", "t", 0.0, 0.0],
        ["b", "h", 0.0, 1.0],
    ]
    # back to normal queueing afterwards
    sub.offer_rows(rows("a", 2))
    assert [m["type"] for m in take(sub)] == ["readings"]


def test_filters_apply_to_readings_and_events():
    sub = subscriber(subscription=Subscription(("a*",), ("t",)))
    sub.offer_rows([("a1", "t", 0.0, 1.0), ("a1", "h", 0.0, 1.0), ("b1", "t", 0.0, 1.0)])
    sub.offer_message({"type": "device", "device": "b1"}, "b1")
    sub.offer_message({"type": "device", "device": "a1"}, "a1")
    out = take(sub, 0.0)
    assert out == [
        {"type": "readings", "readings": [["a1", "t", 0.0, 1.0]]},
        {"type": "device", "device": "a1"},
    ]


def test_too_many_events_means_a_resync():
    sub = subscriber()
    for i in range(EVENT_LIMIT):
        sub.offer_message({"type": "command", "i": i}, "a")
    assert not sub.resync
    sub.offer_message({"type": "command", "i": -1}, "a")
    assert sub.resync and not sub.items and sub.missed_total == EVENT_LIMIT


def test_max_rate_thins_each_series_to_its_latest_value():
    sub = subscriber(subscription=Subscription(max_rate=2.0))  # one update per 0.5 s per series
    sub.offer_rows(rows("a", 3))
    out = take(sub, 10.0)
    assert out[0]["readings"] == [["a", "t", 2.0, 2.0]]
    sub.offer_rows(rows("a", 2, start=3))
    assert take(sub, 10.2) == []  # not due yet: kept
    assert sub.next_due() == pytest.approx(10.5)
    assert take(sub, 10.5)[0]["readings"] == [["a", "t", 4.0, 4.0]]
    assert sub.thinned == 3 and math.isinf(sub.next_due())


def test_heartbeat_and_stats_keep_only_the_latest():
    sub = subscriber()
    sub.offer_stats({"a": {"rate": 1}})
    sub.offer_stats({"a": {"rate": 2}, "b": {"rate": 3}})
    sub.offer_heartbeat({"type": "heartbeat", "time": 1})
    sub.offer_heartbeat({"type": "heartbeat", "time": 2})
    out = take(sub, 0.0)
    assert out == [
        {"type": "stats", "devices": {"a": {"rate": 2}, "b": {"rate": 3}}},
        {"type": "heartbeat", "time": 2, "missed": 0, "queued": 0},
    ]


def test_readings_are_split_into_messages_of_batch_limit():
    sub = Subscriber(1, "t", 10_000, 100, 0.0, matcher=Matcher(Subscription()))
    sub.offer_rows(rows("a", 250))
    assert [len(m["readings"]) for m in take(sub)] == [100, 100, 50]


def test_a_batch_taken_whole_is_encoded_once_for_every_subscriber():
    batch = RowBatch(rows("a", 3))
    subs = [subscriber(limit=100) for _ in range(3)]
    for sub in subs:
        sub.offer_rows(batch)
    texts = [m for sub in subs for m in sub.take(0.0)]
    assert all(isinstance(m, ReadingsText) for m in texts)
    assert texts[0].fragments[0] is texts[1].fragments[0] is texts[2].fragments[0]  # one encoding


def test_series_ring_keeps_the_last_points_in_order():
    ring = SeriesRing(4)
    for i in range(10):
        ring.append(float(i), float(i * 10))
        assert len(ring.t) < 8  # never more than twice the points it keeps
    assert ring.last(4) == ([6.0, 7.0, 8.0, 9.0], [60.0, 70.0, 80.0, 90.0])
    assert ring.last(100) == ring.last(4)
    assert ring.last(2) == ([8.0, 9.0], [80.0, 90.0])
    assert ring.last(0) == ([], [])


# -- the server's own text frames ----------------------------------------------------------------


def _client_receiving():
    """A wsproto client past its handshake, to decode what the server sends."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="test", target="/stream")))
    (_request,) = server.events()
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client, server


@given(st.text(max_size=300) | st.sampled_from(["x" * 125, "x" * 126, "é" * 40_000, "y" * 70_000]))
def test_server_text_frames_are_what_wsproto_would_send(text):
    from wsproto.events import TextMessage

    client, server = _client_receiving()
    frame = stream.server_text_frame(text.encode())
    assert frame == server.send(TextMessage(data=text))  # byte for byte
    client.receive_data(frame + frame)
    events = list(client.events())
    assert [type(e) for e in events] == [TextMessage, TextMessage]
    assert all(e.data == text and e.message_finished for e in events)
