"""What ``bench_fleet_window_http`` judges, on made-up arrivals: the share of a long
window's quota used and refused, from the second window to the end of the measure."""

from __future__ import annotations

from tests.benchmarks.bench_fleet_window_http import QUOTA, SPAN, UNTIL, _figures


def _burst_each_window(start: float, first_call: float) -> list[tuple[float, bool]]:
    """A client that spends each window's count in its first tenth of a second and is
    refused once after it, calls from ``first_call`` to ``UNTIL`` s later."""
    checked: list[tuple[float, bool]] = []
    limit = round(QUOTA * SPAN)
    at = start
    while at < first_call + UNTIL:
        begin = max(at, first_call)
        checked += [(begin + 0.1 * n / limit, True) for n in range(limit)]
        checked.append((begin + 0.1, False))
        at += SPAN
    return checked


def test_a_client_spending_each_windows_count_at_once_is_judged_to_use_it_all() -> None:
    """Every window's count used, not more: the measure ran to ``UNTIL`` s after the first
    call, which fell 1.95 s into the first window, so a tail of 1.95 s held a whole
    window's count and read 1.13 of the quota used (a paced client's tail holds 1.95 s
    of its pace)."""
    start, first_call = 100.0, 101.95
    row = _figures(_burst_each_window(start, first_call), start)
    assert row["used"] <= 1.0, row
    assert row["used"] >= 0.99, row
    assert all(accepted == round(QUOTA * SPAN) for accepted, _ in row["windows"]), row
