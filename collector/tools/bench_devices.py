"""The devices file at fleet size: reading it, and a change saved while the event loop runs.

    collector bench devices                      # 100,000 devices, 3 rounds
    collector bench devices --devices 10000 --rounds 5

Writes a devices file of --devices entries, then, in one event loop with a ticker that
measures how long the loop was kept from running (its longest stop):

reference  what the collector did until 2026-12-04: the file parsed with tomlkit, on the event
           loop (the document kept, to keep the operator's comments), and a change saved on the
           loop by editing that document and dumping it;
collector  the file read with tomllib, nothing kept but the secrets, and a change saved by line
           edits checked by a parse of the result, in a worker thread, as the collector saves an
           API change (DeviceRegistry.save with `changes`: the one change, on the file as it is).

Each change is a new secret for one device. It prints the median time and longest loop stop of
each over --rounds, taking turns, and their ratios.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomlkit
import trio

from collector.devices import DeviceRegistry, write_private
from collector.tools import options


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = options.parser(prog, __doc__)
    p.add_argument(
        "--devices", type=options.at_least(1), default=100_000, help="devices in the file (100,000)"
    )
    p.add_argument(
        "--rounds", type=options.at_least(1), default=3, help="rounds of each, taking turns (3)"
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p


class Ticker:
    """The longest time the event loop was kept from waking a 10 ms sleeper."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await trio.sleep(0.01)
            self.longest = max(self.longest, time.perf_counter() - t0 - 0.01)


async def measure(ticker: Ticker, step: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, longest loop stop) of one step, sync (on the loop) or async."""
    await trio.sleep(0.05)
    ticker.longest = 0.0
    t0 = time.perf_counter()
    result = step()
    if hasattr(result, "__await__"):
        await result
    took = time.perf_counter() - t0
    await trio.sleep(0.05)  # the ticker sees a stop that lasted to the end
    return took, ticker.longest


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-devices-"))
    path = work / "devices.toml"
    DeviceRegistry(
        {f"dev-{i:06d}": f"secret-{i:06d}-{'x' * 16}" for i in range(args.devices)}
    ).save(path)
    size = path.stat().st_size
    rows: dict[str, dict[str, list[float]]] = {
        name: {"load": [], "load_stop": [], "save": [], "save_stop": []}
        for name in ("reference", "collector")
    }

    async def main() -> None:
        ticker = Ticker()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker.run)
            for k in range(args.rounds):
                for name in (
                    ("reference", "collector") if k % 2 == 0 else ("collector", "reference")
                ):
                    device = f"dev-{(k * 7919) % args.devices:06d}"
                    if name == "reference":
                        kept: list[Any] = []
                        took, stop = await measure(
                            ticker,
                            lambda kept=kept: kept.append(
                                tomlkit.parse(path.read_text(encoding="utf-8"))
                            ),
                        )

                        def save_reference(
                            doc: Any = kept[0], device: str = device, k: int = k
                        ) -> None:
                            doc["devices"][device]["secret"] = f"rotated-{k}"
                            write_private(path, tomlkit.dumps(doc))  # as the collector did

                        saved, save_stop = await measure(ticker, save_reference)
                        del save_reference, kept  # the document: not there for the other's GC
                    else:
                        took, stop = await measure(
                            ticker, lambda: trio.to_thread.run_sync(DeviceRegistry.read, path)
                        )
                        reg = DeviceRegistry.load(path)
                        reg.update({device: f"rotated-{k}"})
                        # as the collector saves an API change: this one, on the file as it is
                        save = functools.partial(reg.save, path, changes={device: f"rotated-{k}"})
                        saved, save_stop = await measure(
                            ticker, lambda save=save: trio.to_thread.run_sync(save)
                        )
                    assert DeviceRegistry.read(path)[device] == f"rotated-{k}"
                    reg = None
                    gc.collect()
                    for key, value in (
                        ("load", took),
                        ("load_stop", stop),
                        ("save", saved),
                        ("save_stop", save_stop),
                    ):
                        rows[name][key].append(value)
                    print(
                        f"round {k + 1} {name:9}: read {took:6.2f} s (loop stopped {stop * 1000:7.0f} ms), "
                        f"a new secret saved {saved:6.2f} s (loop stopped {save_stop * 1000:7.0f} ms)",
                        flush=True,
                    )
            nursery.cancel_scope.cancel()

    trio.run(main)
    medians = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    return {"devices": args.devices, "bytes": size, "rounds": rows, "median": medians}


def main(argv: list[str] | None = None, prog: str = "collector bench devices") -> int:
    args = build_parser(prog).parse_args(argv)
    print(f"a devices file of {args.devices:,} devices; {args.rounds} rounds", flush=True)
    result = run(args)
    m = result["median"]
    ref, new = m["reference"], m["collector"]
    print(f"\n{result['bytes'] / 1e6:.1f} MB file; medians of {args.rounds} rounds")
    print(f"{'':22} {'reference':>12} {'collector':>12} {'ratio':>8}")
    for key, label, unit in (
        ("load", "read the file", "s"),
        ("load_stop", "  loop stopped", "ms"),
        ("save", "save a new secret", "s"),
        ("save_stop", "  loop stopped", "ms"),
    ):
        scale = 1000 if unit == "ms" else 1
        a, b = ref[key] * scale, new[key] * scale
        ratio = f"{a / b:7.1f}x" if b > 0 else "      -"
        print(f"{label:22} {a:10.2f} {unit:>1} {b:10.2f} {unit:>1} {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
