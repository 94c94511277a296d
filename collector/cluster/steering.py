"""Steering datagrams to worker processes in the kernel: a classic BPF program for a
SO_REUSEPORT group of UDP sockets (`SO_ATTACH_REUSEPORT_CBPF`).

Sans-IO: the program is a list of instructions; `run_program` executes it the way the kernel
does, so tests (and the collector) can say which worker a datagram reaches without a socket,
and a test with real sockets checks that the kernel agrees.

The program, for N workers:

* a datagram of a session (any type but HELLO): the session id (bytes 4-7, big-endian) mod N.
  Worker i only hands out session ids with `sid % N == i`, so every datagram of a session
  reaches the worker that holds its keys and its replay window;
* a HELLO (type 5, session id 0): a hash of the device id's last four bytes (its last byte
  when it is shorter) mod N. The same device always reaches the same worker, so its second
  HELLO finds the cookie secret that made its COOKIE, and the replay check of client nonces
  sees every registration of the device;
* a datagram too short for what the program reads: the kernel ends the program with 0, so
  worker 0 gets it (and refuses it as malformed).

The index the program returns is a socket's position in the group, which is the order the
sockets joined it, and when a socket closes the last one moves into its place. So the parent
process binds all N sockets in order before any worker starts and keeps them open for its
whole life: a worker that dies leaves its socket (and what queues in it) to its successor.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from typing import NamedTuple

#: Linux's SO_ATTACH_REUSEPORT_CBPF (Python does not name it)
SO_ATTACH_REUSEPORT_CBPF = 51
HELLO_TYPE = 5
#: Knuth's multiplicative hash constant (2^32 / golden ratio)
HASH_MULTIPLIER = 2654435761

# classic BPF opcodes (linux/filter.h)
LDB_ABS = 0x30  # A = packet[k]
LDW_ABS = 0x20  # A = packet[k:k+4], big-endian
LDB_IND = 0x50  # A = packet[X+k]
LDW_IND = 0x40  # A = packet[X+k:X+k+4]
TAX = 0x07  # X = A
JEQ_K = 0x15
JGE_K = 0x35
JA = 0x05
MUL_K = 0x24
RSH_K = 0x74
MOD_K = 0x94
RET_A = 0x16


class Instruction(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


def steering_program(workers: int) -> list[Instruction]:
    """The program for `workers` sockets (see the module's docstring)."""
    if not 1 <= workers <= 1024:
        raise ValueError("between 1 and 1024 workers")
    n = workers
    return [
        Instruction(LDB_ABS, 0, 0, 1),  # 0: A = type
        Instruction(JEQ_K, 3, 0, HELLO_TYPE),  # 1: HELLO? -> 5
        Instruction(LDW_ABS, 0, 0, 4),  # 2: A = session id
        Instruction(MOD_K, 0, 0, n),  # 3
        Instruction(RET_A, 0, 0, 0),  # 4
        Instruction(LDB_ABS, 0, 0, 20),  # 5: A = device id length L
        Instruction(TAX, 0, 0, 0),  # 6: X = L
        Instruction(JGE_K, 0, 2, 4),  # 7: L >= 4? -> 8, else -> 10
        Instruction(LDW_IND, 0, 0, 17),  # 8: A = the id's last 4 bytes (21 + L - 4)
        Instruction(JA, 0, 0, 1),  # 9: -> 11
        Instruction(LDB_IND, 0, 0, 20),  # 10: A = the id's last byte
        Instruction(MUL_K, 0, 0, HASH_MULTIPLIER),  # 11
        Instruction(RSH_K, 0, 0, 16),  # 12
        Instruction(MOD_K, 0, 0, n),  # 13
        Instruction(RET_A, 0, 0, 0),  # 14
    ]


class _OutOfBounds(Exception):
    pass


def run_program(program: Sequence[Instruction], packet: bytes) -> int:
    """Execute `program` on `packet` like the kernel's classic BPF interpreter (only the
    instructions `steering_program` uses): a load past the end returns 0."""
    a = x = 0
    pc = 0

    def load(offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(packet):
            raise _OutOfBounds
        return int.from_bytes(packet[offset : offset + size], "big")

    try:
        while True:
            code, jt, jf, k = program[pc]
            pc += 1
            if code == LDB_ABS:
                a = load(k, 1)
            elif code == LDW_ABS:
                a = load(k, 4)
            elif code == LDB_IND:
                a = load(x + k, 1)
            elif code == LDW_IND:
                a = load(x + k, 4)
            elif code == TAX:
                x = a
            elif code == JEQ_K:
                pc += jt if a == k else jf
            elif code == JGE_K:
                pc += jt if a >= k else jf
            elif code == JA:
                pc += k
            elif code == MUL_K:
                a = (a * k) & 0xFFFFFFFF
            elif code == RSH_K:
                a >>= k
            elif code == MOD_K:
                a %= k
            elif code == RET_A:
                return a
            else:  # pragma: no cover - only our own programs run here
                raise ValueError(f"opcode {code:#x} is not interpreted")
    except _OutOfBounds:
        return 0


def worker_for(packet: bytes, workers: int) -> int:
    """Which worker's socket the kernel gives `packet` to."""
    return run_program(steering_program(workers), packet) if workers > 1 else 0


def session_id_for(worker: int, workers: int, random32: int) -> int:
    """A session id in worker `worker`'s share (`sid % workers == worker`), from 32 random
    bits; 0 when the random bits give 0 or overflow (the caller draws again)."""
    sid = random32 - random32 % workers + worker
    return sid if 0 < sid < 2**32 else 0


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


def attach(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """Attach `program` to the SO_REUSEPORT group of `sock` (any member will do)."""
    filters = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    fprog = _SockFprog(len(program), filters)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    del filters  # the kernel copied the program during setsockopt


def encode_program(program: Sequence[Instruction]) -> bytes:
    """The program as the kernel's array of `struct sock_filter` (for a test or a dump)."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in program)
