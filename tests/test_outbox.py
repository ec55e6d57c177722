"""The socket session's outbox, without sockets: its bounds, a write's batch, and what a resume
may add to it."""

import pytest

from relay_lite import _WRITE_BATCH_BYTES, _WRITE_BATCH_FRAMES, _Outbox


def test_frames_fit_until_either_bound_and_the_reason_names_it():
    outbox = _Outbox(max_frames=3, max_bytes=100)
    assert [outbox.put(b"x" * 10) for _ in range(3)] == ["", "", ""]
    assert outbox.put(b"x") == "3 frames waiting unread"
    outbox = _Outbox(max_frames=10, max_bytes=100)
    assert outbox.put(b"x" * 60) == "" and outbox.put(b"x" * 41) == "over 100 bytes waiting unread"
    assert (len(outbox), outbox.bytes) == (1, 60)  # the refused frame took nothing


def test_a_frame_larger_than_the_byte_bound_goes_alone():
    outbox = _Outbox(max_frames=10, max_bytes=100)
    assert outbox.put(b"x" * 500) == ""
    assert outbox.put(b"y") == "over 100 bytes waiting unread"
    assert outbox.take() == [b"x" * 500] and outbox.put(b"y") == ""


def test_a_write_takes_what_waits_up_to_its_bounds():
    outbox = _Outbox(max_frames=1000, max_bytes=2**30)
    for _ in range(_WRITE_BATCH_FRAMES + 5):
        outbox.put(b"f")
    assert len(outbox.take()) == _WRITE_BATCH_FRAMES and len(outbox.take()) == 5 and outbox.take() == []
    big = b"b" * (_WRITE_BATCH_BYTES // 2 + 1)
    for _ in range(3):
        outbox.put(big)
    assert outbox.take() == [big, big] and outbox.bytes == len(big)  # stops once past a write's bytes


def test_closing_keeps_what_waits_unless_told_to_drop_it():
    outbox = _Outbox(max_frames=10, max_bytes=100)
    outbox.put(b"unauthorized")
    outbox.close()
    assert outbox.put(b"late") == "" and outbox.take() == [b"unauthorized"] and not len(outbox)
    outbox = _Outbox(max_frames=10, max_bytes=100)
    outbox.put(b"queued")
    outbox.close(drop=True)
    assert (len(outbox), outbox.bytes, outbox.take()) == (0, 0, [])


@pytest.mark.parametrize("max_frames, max_bytes, queued, room", [
    (1000, 8 * 2**20, [], (500, _WRITE_BATCH_BYTES)),  # half the frames; a write's bytes
    (1000, 2**20, [b"x" * 1000] * 10, (490, 2**19 - 10_000)),  # half of max_bytes, less what waits
    (1, 100, [], (1, 50)),  # a one-frame outbox still lets a resume go on
    (10, 100, [b"x" * 60], (4, -10)),  # full enough: nothing now, more after the next write
])
def test_a_resume_fills_at_most_half_the_outbox(max_frames, max_bytes, queued, room):
    outbox = _Outbox(max_frames, max_bytes)
    for frame in queued:
        outbox.put(frame)
    assert outbox.replay_room() == room


def test_a_frame_for_a_waiting_writer_does_not_count_against_the_frames():
    outbox = _Outbox(max_frames=2, max_bytes=100)
    outbox.writer_waiting = True  # it takes the first frame as soon as it runs
    assert [outbox.put(b"f") for _ in range(3)] == ["", "", ""]
    assert outbox.put(b"f") == "2 frames waiting unread"
    assert len(outbox.take()) == 3 and not outbox.writer_waiting
