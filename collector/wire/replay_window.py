"""Sliding anti-replay window in the style of RFC 6479 (sans-IO).

The window is a ring of 64-bit blocks; advancing it clears whole blocks instead of shifting a
bitmap, so the cost of an update does not depend on the window size. Use `check()` before
verifying a datagram's tag (cheap early rejection) and `update()` only after the tag verified,
so forged datagrams can never move the window.

Sequence numbers in a session start at 1; 0 is never accepted.
"""

from __future__ import annotations

BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BIT_MASK = BLOCK_BITS - 1

#: `update()` results that are not a gap count.
LATE = -1  # new, but below the highest seen: it fills a hole (arrived out of order)
DUPLICATE = -2  # seen before (a retransmission, a duplicate or a replay)
TOO_OLD = -3  # so far below the highest seen that the window cannot tell: rejected


class ReplayWindow:
    """Tracks which sequence numbers of one session were accepted.

    `size` sequence numbers below the highest accepted one are remembered exactly; anything
    older is rejected as TOO_OLD.
    """

    __slots__ = ("_blocks", "_mask", "top")

    def __init__(self, blocks: int = 16) -> None:
        if blocks < 2 or blocks & (blocks - 1):
            raise ValueError("blocks must be a power of two >= 2")
        self._blocks = [0] * blocks
        self._blocks[0] = 1  # sequence number 0 counts as already seen
        self._mask = blocks - 1
        self.top = 0

    @property
    def size(self) -> int:
        return (len(self._blocks) - 1) * BLOCK_BITS

    def check(self, seq: int) -> int:
        """Classify `seq` without changing anything: 0 (new), LATE, DUPLICATE or TOO_OLD."""
        top = self.top
        if seq > top:
            return 0
        if top - seq >= self.size:
            return TOO_OLD
        if self._blocks[(seq >> _BLOCK_SHIFT) & self._mask] & (1 << (seq & _BIT_MASK)):
            return DUPLICATE
        return LATE

    def update(self, seq: int) -> int:
        """Accept `seq` if it is new.

        Returns the number of sequence numbers skipped (>= 0) when `seq` is the new highest,
        LATE when it fills a hole, or DUPLICATE / TOO_OLD when it must be rejected (and then
        nothing changes).
        """
        top = self.top
        blocks = self._blocks
        mask = self._mask
        if seq > top:
            index = seq >> _BLOCK_SHIFT
            top_index = top >> _BLOCK_SHIFT
            diff = index - top_index
            if diff:
                if diff > len(blocks):
                    diff = len(blocks)
                for i in range(1, diff + 1):
                    blocks[(top_index + i) & mask] = 0
            blocks[index & mask] |= 1 << (seq & _BIT_MASK)
            self.top = seq
            return seq - top - 1
        if top - seq >= self.size:
            return TOO_OLD
        i = (seq >> _BLOCK_SHIFT) & mask
        bit = 1 << (seq & _BIT_MASK)
        if blocks[i] & bit:
            return DUPLICATE
        blocks[i] |= bit
        return LATE

    def complete_up_to(self, n: int) -> bool:
        """Every sequence number from 1 to `n` was accepted (as far as the window remembers:
        the `size` numbers below the highest)."""
        top = self.top
        if top < n:
            return False
        blocks, mask = self._blocks, self._mask
        for seq in range(max(1, top - self.size + 1), n + 1):
            if not blocks[(seq >> _BLOCK_SHIFT) & mask] & (1 << (seq & _BIT_MASK)):
                return False
        return True
