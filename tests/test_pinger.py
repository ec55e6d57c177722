"""The relay's ping timing wheel, on trio's autojump clock: no real waiting."""

import trio

import relay_lite


class Recorder:
    wire = relay_lite._SOCKET_WIRE

    def __init__(self) -> None:
        self.pings: list[float] = []

    def deliver(self, frame: bytes) -> None:
        assert b'"status":"ping"' in frame
        self.pings.append(trio.current_time())


async def test_each_socket_is_pinged_every_interval_from_when_it_joined(autojump_clock):
    pinger = relay_lite._Pinger(interval=30)
    sessions = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        start = trio.current_time()
        for joined in (0, 0.5, 7.2, 29.9, 31):
            await trio.sleep_until(start + joined)
            sessions[joined] = Recorder()
            pinger.add(sessions[joined])
        await trio.sleep_until(start + 200)
        left = sessions.pop(31)
        pinger.discard(left)
        pings_when_left = len(left.pings)
        await trio.sleep_until(start + 300)
        nursery.cancel_scope.cancel()

    assert len(left.pings) == pings_when_left  # no pings after discard
    for joined, session in sessions.items():
        first, *rest = session.pings
        assert 29 <= first - (start + joined) <= 30  # within one tick (1 s) of a full interval
        gaps = [later - earlier for earlier, later in zip(session.pings, session.pings[1:])]
        assert gaps and all(abs(gap - 30) < 1e-6 for gap in gaps)
        assert len(session.pings) >= 9


async def test_pings_are_spread_over_the_interval(autojump_clock):
    pinger = relay_lite._Pinger(interval=30)
    recorders = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger.run)
        for _ in range(300):  # a socket joins every 0.1 s for 30 s
            recorders.append(Recorder())
            pinger.add(recorders[-1])
            await trio.sleep(0.1)
        start = trio.current_time()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    per_tick: dict[float, int] = {}
    for recorder in recorders:
        for when in recorder.pings:
            if when > start:
                per_tick[round(when, 3)] = per_tick.get(round(when, 3), 0) + 1
    assert sum(per_tick.values()) == 300  # each pinged once in the interval
    assert max(per_tick.values()) <= 11  # a thirtieth of them per tick, give or take a join on a tick
