"""The collector's one measure of busy (collector.core.load), without an event loop."""

from collector.core.load import BusyMeter


class FakeCpu:
    def __init__(self) -> None:
        self.used = 0.0

    def __call__(self) -> float:
        return self.used


def verdicts(meter: BusyMeter, cpu: FakeCpu, shares: list[float], start: int = 1) -> list[bool]:
    """One window of one second per share of a core used; the verdict after each."""
    out = []
    for second, share in enumerate(shares, start=start):
        cpu.used += share
        out.append(meter.busy(float(second)))
    return out


def test_busy_is_the_share_of_a_core_over_the_last_complete_window():
    cpu = FakeCpu()
    meter = BusyMeter(share=0.5, window=1.0, cpu=cpu, calm=0.5)
    assert not meter.busy(0.0)  # nothing measured yet
    cpu.used = 0.9
    assert not meter.busy(0.5)  # the window is not over: the last verdict stands
    assert meter.busy(1.0)  # 0.9 s of CPU in 1 s
    cpu.used += 0.3
    assert meter.busy(1.5)  # still the verdict of the last complete window
    assert not meter.busy(2.0)  # 0.3
    assert verdicts(meter, cpu, [0.5], start=3) == [False]  # exactly half is not more than half


def test_a_quiet_stretch_is_never_taken_for_load():
    cpu = FakeCpu()
    meter = BusyMeter(share=0.5, window=1.0, cpu=cpu, calm=0.35)
    meter.busy(0.0)
    assert verdicts(meter, cpu, [1.0]) == [True]
    cpu.used += 2.5  # a burst, then a long stretch of nothing
    assert not meter.busy(101.0)  # the window that ends now spans the quiet: act at once


def test_once_busy_it_stays_busy_until_the_load_falls_well_below_the_threshold():
    # Batching lowers the load it is measured by: with one threshold a collector that is busy
    # at 0.55 of a core and runs at 0.45 while batching would switch back and forth.
    cpu = FakeCpu()
    meter = BusyMeter(share=0.5, window=1.0, cpu=cpu, calm=0.35)
    meter.busy(0.0)
    assert verdicts(meter, cpu, [0.45, 0.55, 0.45, 0.36, 0.34, 0.45, 0.51]) == [
        False,  # 0.45: not busy yet
        True,  # 0.55: busy
        True,  # 0.45 while batching: still busy
        True,  # 0.36
        False,  # 0.34: calm again
        False,  # 0.45 is not enough to become busy again
        True,
    ]
