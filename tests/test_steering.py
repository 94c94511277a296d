"""The kernel steering of `serve --workers N` (collector/cluster/steering.py): the program's
rules without a socket, then the kernel agreeing with them on real SO_REUSEPORT sockets."""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.cluster import steering
from collector.cluster.bus import EntryIds, Outbox


def session_datagram(sid: int, kind: int = 2, body: bytes = b"x" * 20) -> bytes:
    return struct.pack(">BBBBIIQ", 2, kind, 0, 0, sid, 7, 123) + body


def hello(device_id: str, nonce: bytes, t: int = 1) -> bytes:
    d = device_id.encode()
    return struct.pack(">BBBBIIQ", 2, 5, 0, 0, 0, 0, t) + bytes([len(d)]) + d + nonce + b"c" * 48


@given(st.integers(1, 2**32 - 1), st.integers(2, 16), st.sampled_from([1, 2, 3, 4, 7]))
def test_a_session_datagram_goes_to_the_worker_of_its_session_id(sid, workers, kind):
    assert steering.worker_for(session_datagram(sid, kind), workers) == sid % workers


@given(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=1, max_size=64),
    st.binary(min_size=12, max_size=12),
    st.binary(min_size=12, max_size=12),
    st.integers(0, 2**64 - 1),
    st.integers(2, 16),
)
def test_every_hello_of_a_device_goes_to_the_same_worker(device_id, n1, n2, t, workers):
    # the nonce and the device time change between a device's HELLOs; its id does not
    first = steering.worker_for(hello(device_id, n1, t), workers)
    assert first == steering.worker_for(hello(device_id, n2, 0), workers)
    assert 0 <= first < workers


def test_hellos_spread_over_the_workers():
    counts = [0, 0, 0]
    for i in range(3000):
        counts[steering.worker_for(hello(f"sensor-{i:04d}", b"n" * 12), 3)] += 1
    assert min(counts) > 800, counts


@given(st.binary(max_size=24), st.integers(2, 8))
def test_what_the_program_cannot_read_goes_to_worker_0_or_by_its_rules(data, workers):
    w = steering.worker_for(data, workers)
    assert 0 <= w < workers
    if len(data) < 8:
        assert w == 0


@given(st.integers(0, 2**32 - 1), st.integers(1, 64), st.integers(0, 63))
def test_a_worker_hands_out_only_its_share_of_session_ids(bits, workers, index):
    index %= workers
    sid = steering.session_id_for(index, workers, bits)
    assert sid == 0 or (0 < sid < 2**32 and sid % workers == index)


def test_the_kernel_steers_as_the_program_says():
    workers = 3
    socks = []
    port = 0
    try:
        for _ in range(workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.setblocking(False)
        steering.attach(socks[0], steering.steering_program(workers))
        got: dict[bytes, int] = {}

        def drain() -> None:
            for i, s in enumerate(socks):
                while True:
                    try:
                        got[s.recv(2048)] = i
                    except BlockingIOError:
                        break

        rng = random.Random(7)
        sent = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(1500):
                if i % 3 == 0:
                    p = hello(
                        f"dev-{rng.randrange(10**6)}"[: rng.randrange(1, 10)], rng.randbytes(12)
                    )
                else:
                    p = session_datagram(
                        rng.randrange(1, 2**32), body=rng.randbytes(rng.randrange(40))
                    )
                sent.append(p)
                client.sendto(p, ("127.0.0.1", port))
                if i % 50 == 49:
                    time.sleep(0.002)
                    drain()
            deadline = time.monotonic() + 5
            while len(got) < len({*sent}) and time.monotonic() < deadline:
                time.sleep(0.01)
                drain()
        assert len(got) == len(set(sent))
        wrong = [p for p in sent if got[p] != steering.worker_for(p, workers)]
        assert not wrong
        assert len(set(got.values())) == workers
    finally:
        for s in socks:
            s.close()


def test_entry_ids_only_grow():
    now = [1000.0]
    ids = EntryIds(lambda: now[0])
    a = ids.next()
    b = ids.next()
    now[0] = 999.0  # the clock steps back
    c = ids.next()
    ids.floor(b"5000000-3")  # what the stream held already (a restarted node)
    d = ids.next()
    keys = [tuple(map(int, x.split("-"))) for x in (a, b, c, d)]
    assert keys == sorted(keys) and len(set(keys)) == 4
    assert keys[-1] > (5000000, 3)


@given(
    st.lists(st.tuples(st.sampled_from("ptgs"), st.integers(0, 9)), max_size=200),
    st.integers(1, 20),
)
def test_the_outbox_counts_exactly_what_it_drops(ops, limit):
    """Every reading put is exactly one of: waiting, in flight, sent, or dropped and counted
    (entries may merge on the way out, readings never get lost or doubled). Order is kept
    through failed batches."""
    box = Outbox(limit)
    put = put_readings = sent = sent_readings = 0
    in_flight: list[tuple[str, str, bytes, int]] = []
    for op, n in ops:
        if op == "p":
            box.put("s", f"{put:05d}", b"d", n)
            put += 1
            put_readings += n
        elif op == "t" and not in_flight:
            in_flight = box.take(n + 1)
        elif op == "g":  # the batch failed: first in line again
            box.give_back(in_flight)
            in_flight = []
        elif op == "s":  # the batch went out
            sent += len(in_flight)
            sent_readings += sum(e[3] for e in in_flight)
            in_flight = []
        assert len(box.entries) <= limit
        assert box.dropped <= put
        waiting = sum(e[3] for e in box.entries) + sum(e[3] for e in in_flight)
        assert put_readings == waiting + sent_readings + box.dropped_readings
        ids = [e[1] for e in box.entries]
        assert ids == sorted(ids)


def test_waiting_readings_go_out_as_one_entry_but_a_resent_one_stays_as_it_was():
    box = Outbox(10)
    for i in range(3):
        box.put("r", f"1-{i}", b"rec%d" % i, 2)
    box.put("e", "1-3", b"event", 0)
    batch = box.take(10)
    assert batch == [("r", "1-0", b"rec0rec1rec2", 6), ("e", "1-3", b"event", 0)]
    box.give_back(batch)  # its fate unknown: Redis may hold 1-0 with those three records
    box.put("r", "1-4", b"rec4", 1)
    again = box.take(10)
    assert again[0] == ("r", "1-0", b"rec0rec1rec2", 6)  # exactly as before, not merged further
    assert again[-1] == ("r", "1-4", b"rec4", 1)


def test_a_heartbeat_goes_ahead_of_other_streams_but_never_of_its_own():
    """A heartbeat written around the queue with a newer id made Redis refuse the node's older
    queued events ("equal or smaller"), which were then lost: it now waits in the queue
    behind its own stream's entries, ahead of a backlog of readings."""
    box = Outbox(100)
    box.put("events", "1-0", b"online", 0)
    for i in range(5):
        box.put("readings", f"1-{i + 1}", b"r", 1)
    box.put("events", "1-6", b"offline", 0)
    box.put("readings", "1-7", b"r", 1)
    box.put_early("events", "1-8", b"hb")
    order = [(e[0], e[1]) for e in box.entries]
    assert order.index(("events", "1-8")) == order.index(("events", "1-6")) + 1
    events = [e[1] for e in box.entries if e[0] == "events"]
    assert events == sorted(events) == ["1-0", "1-6", "1-8"]
    assert box.holds("1-8") and not box.holds("9-9")
    batch = box.take(100)
    assert box.holds("1-8") is False  # taken: in flight, not waiting
    box.give_back(batch)  # failed: may be in Redis
    assert box.holds("1-8")
    box.sent(box.take(100))
    assert not box.holds("1-8")
    only_readings = Outbox(10)
    only_readings.put("readings", "2-0", b"r", 1)
    only_readings.put_early("events", "2-1", b"hb")
    assert [e[0] for e in only_readings.entries] == ["events", "readings"]


def test_attach_refuses_nothing_it_builds():
    prog = steering.steering_program(4)
    assert len(steering.encode_program(prog)) == 8 * len(prog)
    with pytest.raises(ValueError):
        steering.steering_program(0)
