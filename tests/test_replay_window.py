from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.wire.replay_window import DUPLICATE, LATE, TOO_OLD, ReplayWindow


def test_in_order_sequence_has_no_gaps():
    w = ReplayWindow()
    assert [w.update(s) for s in range(1, 200)] == [0] * 199


def test_gap_then_late_fill():
    w = ReplayWindow()
    assert w.update(1) == 0
    assert w.update(5) == 3  # 2, 3, 4 skipped
    assert w.update(3) == LATE
    assert w.update(3) == DUPLICATE
    assert w.update(5) == DUPLICATE
    assert w.check(4) == LATE and w.check(6) == 0


def test_zero_is_never_accepted():
    assert ReplayWindow().update(0) == DUPLICATE


def test_too_old_is_rejected_and_changes_nothing():
    w = ReplayWindow(blocks=4)  # remembers 192 below the top
    assert w.size == 192
    w.update(1000)
    assert w.update(1000 - 192) == TOO_OLD
    assert w.update(1000 - 191) == LATE
    assert w.top == 1000


def test_big_jump_clears_the_whole_ring():
    w = ReplayWindow(blocks=4)
    for s in range(1, 250):
        w.update(s)
    assert w.update(10_000_000) == 10_000_000 - 249 - 1
    # everything within the window below the new top is unseen
    assert all(w.check(10_000_000 - k) == LATE for k in range(1, 192))


def test_blocks_must_be_power_of_two():
    with pytest.raises(ValueError):
        ReplayWindow(blocks=3)


@given(st.lists(st.integers(0, 3000), max_size=400), st.sampled_from([2, 4, 16]))
def test_matches_a_reference_model(seqs, blocks):
    """Compare against the obvious (unbounded) model: a set plus the window rule."""
    w = ReplayWindow(blocks)
    seen: set[int] = {0}
    top = 0
    for s in seqs:
        if s > top:
            expected = s - top - 1
        elif top - s >= w.size:
            expected = TOO_OLD
        elif s in seen:
            expected = DUPLICATE
        else:
            expected = LATE
        assert w.check(s) == (0 if expected >= 0 else expected)
        assert w.update(s) == expected
        if expected not in (DUPLICATE, TOO_OLD):
            seen.add(s)
            top = max(top, s)
    assert w.top == top


@given(st.permutations(range(1, 301)))
def test_loss_accounting_is_exact_for_any_order_within_the_window(order):
    """lost = gaps opened - holes filled: at the end it equals the never-seen count."""
    w = ReplayWindow()
    delivered = order[:250]
    lost = 0
    for s in delivered:
        r = w.update(s)
        lost += r if r >= 0 else -1 if r == LATE else 0
    assert lost == max(delivered) - len(delivered)
