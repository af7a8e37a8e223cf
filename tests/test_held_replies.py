"""Requests sent in a quick succession leave together and an engine holds replies while more
requests are queued behind them (decision 0010): nothing is lost or reordered, and a short
request's result is not kept back until a long request queued behind it ends."""

from __future__ import annotations

import time

import pytest

from cluster_util import EngineGate
from ferroparallel import Client

pytest_plugins = ("cluster_fixtures",)
pytestmark = pytest.mark.timeout(120)


def _quick(i: int) -> int:
    return i


def test_a_quick_result_is_not_held_until_the_long_request_behind_it_ends(rc: Client) -> None:
    view = rc[rc.ids[0]]
    quick = view.apply_async(_quick, 1)
    slow = view.apply_async(time.sleep, 4)  # sent at once behind: queued on the engine
    assert quick.get(timeout=30) == 1
    assert not slow.ready(), "the quick result waited for the slow request"
    slow.get(timeout=30)


def test_bursts_to_one_engine_come_back_complete_and_in_order(rc: Client) -> None:
    view = rc[rc.ids[0]]
    ars = [view.apply_async(_quick, i) for i in range(3000)]
    assert [ar.get(timeout=60) for ar in ars] == list(range(3000))
    done = [ar.metadata["completed"] for ar in ars]
    assert done == sorted(done), "one engine completes its requests in the order sent"


def test_a_request_then_an_abort_of_it_arrive_in_that_order(
    rc: Client, engine_gate: EngineGate
) -> None:
    view = rc[rc.ids[0]]
    blocker = view.apply_async(engine_gate.task())  # busy until the engine has the abort
    queued = [view.apply_async(_quick, i) for i in range(20)]
    aborted = rc.abort(queued)  # sent within the burst: must not overtake the requests it names
    aborted.get(timeout=30)
    engine_gate.open()
    blocker.get(timeout=30)
    outcomes = []
    for ar in queued:
        try:
            outcomes.append(ar.get(timeout=30))
        except Exception as e:  # noqa: BLE001 - the aborted ones
            outcomes.append(type(e).__name__)
    assert outcomes == ["TaskAborted"] * 20
