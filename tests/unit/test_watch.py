"""FolderWatcher: a file is handed out once, only after its size and mtime have settled; temp names wait.

The settle clock is faked (``xraybatch.watch.time``), so no test sleeps for a settle time; the observer
(inotify or polling) is real and only needs to notice files, which :func:`_eventually` waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xraybatch import watch
from xraybatch.settings import WatchConfig
from xraybatch.watch import FolderWatcher

SETTLE = 2.0


class FakeClock:
    """Stands in for the ``time`` module inside ``xraybatch.watch``: only ``monotonic`` moves, by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(watch, "time", fake)
    return fake


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def cfg(request: pytest.FixtureRequest) -> WatchConfig:
    return WatchConfig(settle_seconds=SETTLE, poll_seconds=0.05, rescan_seconds=1e9, polling=request.param)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "incoming"
    path.mkdir()
    return path


@pytest.fixture
def watcher(folder: Path, cfg: WatchConfig, clock: FakeClock) -> Iterator[FolderWatcher]:
    with FolderWatcher(folder, cfg) as w:
        yield w


def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (real time) for the observer thread to report what the test did to the folder."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.02)


def _settled(watcher: FolderWatcher, clock: FakeClock) -> list[Path]:
    """Observe the files once, let the settle time pass, and collect what is ready."""
    first = watcher.ready()
    clock.advance(SETTLE)
    return first + watcher.ready()


def test_a_complete_file_is_handed_out_once_after_the_settle_time(
    folder: Path, watcher: FolderWatcher, clock: FakeClock
) -> None:
    path = folder / "a.dcm"
    path.write_bytes(b"x" * 100)
    _eventually(lambda: watcher.pending() == 1)
    assert watcher.ready() == []  # first observation starts the settle clock
    clock.advance(SETTLE / 2)
    assert watcher.ready() == []
    clock.advance(SETTLE / 2)
    assert watcher.ready() == [path]
    clock.advance(SETTLE * 2)
    assert watcher.ready() == []
    assert watcher.pending() == 0


def test_a_growing_file_is_not_ready_until_it_stops_growing(
    folder: Path, watcher: FolderWatcher, clock: FakeClock
) -> None:
    path = folder / "slow.dcm"
    with open(path, "wb") as fh:
        for _ in range(5):
            fh.write(b"x" * 1000)
            fh.flush()
            _eventually(lambda: watcher.pending() == 1)
            assert watcher.ready() == []
            clock.advance(SETTLE * 0.9)  # each chunk arrives within the settle time
    assert watcher.ready() == []  # the last chunk's size is seen here for the first time
    clock.advance(SETTLE)
    assert watcher.ready() == [path]


def test_a_file_rewritten_with_the_same_size_waits_for_the_new_mtime(
    folder: Path, watcher: FolderWatcher, clock: FakeClock
) -> None:
    path = folder / "same-size.dcm"
    path.write_bytes(b"a" * 10)
    _eventually(lambda: watcher.pending() == 1)
    assert watcher.ready() == []
    clock.advance(SETTLE * 0.9)
    path.write_bytes(b"b" * 10)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert watcher.ready() == []
    clock.advance(SETTLE * 0.9)
    assert watcher.ready() == []
    clock.advance(SETTLE * 0.1)
    assert watcher.ready() == [path]


@pytest.mark.parametrize("name", ["x.dcm.part", "x.tmp", ".x.dcm", ".hidden/x.dcm"])
def test_temporary_names_are_ignored_until_renamed(
    folder: Path, watcher: FolderWatcher, clock: FakeClock, name: str
) -> None:
    temp = folder / name
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"x" * 10)
    watcher.scan()
    assert watcher.pending() == 0
    assert _settled(watcher, clock) == []
    final = folder / "x.dcm"
    os.rename(temp, final)
    _eventually(lambda: watcher.pending() == 1)
    assert _settled(watcher, clock) == [final]


def test_ignored_matches_names_and_parent_folders(folder: Path, cfg: WatchConfig) -> None:
    w = FolderWatcher(folder, cfg)
    assert w.ignored(folder / "a.part")
    assert w.ignored(folder / ".a")
    assert w.ignored(folder / ".sender" / "a.dcm")
    assert w.ignored(folder / "x.tmp" / "a.dcm")
    assert not w.ignored(folder / "sub" / "a.dcm")
    assert not w.ignored(folder / "a.dcm")


def test_the_start_up_scan_finds_files_that_arrived_while_down(
    folder: Path, cfg: WatchConfig, clock: FakeClock
) -> None:
    old = [folder / "1.dcm", folder / "sub" / "2.dcm"]
    for path in old:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    (folder / "3.part").write_bytes(b"x")
    with FolderWatcher(folder, cfg) as w:
        assert w.pending() == 2  # noted at once, before any event
        assert _settled(w, clock) == sorted(old)


def test_a_vanished_file_is_dropped(folder: Path, watcher: FolderWatcher, clock: FakeClock) -> None:
    path = folder / "gone.dcm"
    path.write_bytes(b"x")
    _eventually(lambda: watcher.pending() == 1)
    assert watcher.ready() == []
    path.unlink()
    clock.advance(SETTLE)
    assert watcher.ready() == []
    assert watcher.pending() == 0


def _handed_out(folder: Path, watcher: FolderWatcher, clock: FakeClock) -> Path:
    """Write one file, let the observer see it and the settle time pass; it is handed out by ``ready()``."""
    path = folder / "a.dcm"
    path.write_bytes(b"x")
    _eventually(lambda: watcher.pending() == 1)
    assert _settled(watcher, clock) == [path]
    return path


def test_files_taken_away_do_not_count_as_pending(
    folder: Path, watcher: FolderWatcher, clock: FakeClock, tmp_path: Path
) -> None:
    """A file moved out of the folder (by this or another worker) must not look like one still settling."""
    path = _handed_out(folder, watcher, clock)
    os.rename(path, tmp_path / "taken")
    time.sleep(0.3)  # let the observer report the move
    assert watcher.pending() == 0


def test_a_late_event_for_a_file_handed_out_leaves_nothing_pending_once_it_is_taken(
    folder: Path, watcher: FolderWatcher, clock: FakeClock, tmp_path: Path
) -> None:
    """The observer may deliver an event of the file's own writing after :meth:`ready` handed it out."""
    path = _handed_out(folder, watcher, clock)
    watcher.note(path)  # the late event, before the worker takes the file
    os.rename(path, tmp_path / "taken")  # the worker takes it: no event names the drop folder
    assert watcher.pending() == 0
    assert watcher.ready() == []


def test_a_directory_and_a_symlink_are_not_handed_out(
    folder: Path, watcher: FolderWatcher, clock: FakeClock, tmp_path: Path
) -> None:
    (folder / "subdir").mkdir()
    target = tmp_path / "elsewhere.dcm"
    target.write_bytes(b"x")
    (folder / "link.dcm").symlink_to(target)
    watcher.scan()
    assert _settled(watcher, clock) == []


def test_links_fifos_and_linked_folders_are_logged_once_and_never_opened(
    folder: Path, watcher: FolderWatcher, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x.dcm").write_bytes(b"x")
    (folder / "link.dcm").symlink_to(target / "x.dcm")
    (folder / "linked-folder").symlink_to(target, target_is_directory=True)
    os.mkfifo(folder / "pipe")  # opening it would block for ever
    (folder / "sub").mkdir()
    (folder / "sub" / "real.dcm").write_bytes(b"y")
    with caplog.at_level(logging.WARNING, logger="xraybatch.watch"):
        for _ in range(3):
            watcher.scan()
        assert _settled(watcher, clock) == [folder / "sub" / "real.dcm"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # one line each for the link, the linked folder and the FIFO
    assert sum("a symbolic link" in line for line in lines) == 2 and sum("a FIFO" in line for line in lines) == 1
    assert not any("link.dcm" in line or "pipe" in line for line in lines)  # named by digest only


def test_complete_files_yields_until_stopped(folder: Path, clock: FakeClock) -> None:
    import threading

    cfg = WatchConfig(settle_seconds=SETTLE, poll_seconds=0.01, rescan_seconds=1e9)
    (folder / "a.dcm").write_bytes(b"x")
    stop = threading.Event()
    seen: list[Path] = []
    for i, batch in enumerate(watch.complete_files(folder, cfg, stop)):
        seen += batch
        clock.advance(SETTLE)
        if seen or i > 10:
            stop.set()
    assert seen == [folder / "a.dcm"]


def test_the_settle_time_runs_from_the_first_event(folder: Path, watcher: FolderWatcher, clock: FakeClock) -> None:
    """No poll period is added: a file seen by an event is ready ``settle_seconds`` later, at the first look."""
    staged = folder.parent / "a.dcm"
    staged.write_bytes(b"x")  # written beside, renamed in: one event that sees the whole file
    path = folder / "a.dcm"
    os.rename(staged, path)
    _eventually(lambda: watcher.pending() == 1)
    clock.advance(SETTLE)
    assert watcher.ready() == [path]


def test_an_event_that_finds_the_file_changed_restarts_the_settle_time(
    folder: Path, watcher: FolderWatcher, clock: FakeClock
) -> None:
    path = folder / "a.dcm"
    path.write_bytes(b"")
    watcher.note(path)  # the create event: nothing written yet
    clock.advance(1.0)
    path.write_bytes(b"xyz")
    watcher.note(path)  # the write event: settling starts again from here
    clock.advance(SETTLE - 0.1)
    assert watcher.ready() == []
    clock.advance(0.1)
    assert watcher.ready() == [path]


def test_paths_outside_the_folder_are_never_noted(folder: Path, watcher: FolderWatcher, tmp_path: Path) -> None:
    """A file moved out (e.g. to WORKDIR/inflight) must never come back as a candidate."""
    elsewhere = tmp_path / "inflight" / "x"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    watcher.note(elsewhere)
    watcher.note(folder / "never-existed.dcm")
    assert watcher.pending() == 0


def test_next_wait_is_the_time_left_until_the_first_file_settles(
    folder: Path, cfg: WatchConfig, clock: FakeClock
) -> None:
    """The daemon sleeps ``next_wait()``: a file is handed out when it settles, not up to a poll later."""
    slow = WatchConfig(settle_seconds=SETTLE, poll_seconds=2.5, rescan_seconds=1e9, polling=cfg.polling)
    with FolderWatcher(folder, slow) as w:
        assert w.next_wait() == 2.5  # nothing noted: a poll
        # Written outside and renamed in, so one event brings the final size: an event of a write that the
        # observer delivers after the clock moves would start the settle time again.
        (folder.parent / "a.part").write_bytes(b"x")
        (folder.parent / "a.part").rename(folder / "a.dcm")
        _eventually(lambda: w.pending() == 1)
        assert w.next_wait() == pytest.approx(SETTLE)
        clock.advance(SETTLE - 0.5)
        assert w.next_wait() == pytest.approx(0.5)
        clock.advance(0.5)
        assert w.next_wait() == 0.05  # due: a short floor, never a busy loop
        assert w.ready() == [folder / "a.dcm"]
        assert w.next_wait() == 2.5


def test_the_supervisor_gives_up_on_workers_that_keep_exiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``watch --workers N``: workers that exit at once every time (here ``xraybatch --version``, as a setting no
    worker can start with would) are replaced after the restart delay until they have exited more than
    RESTART_LIMIT_PER_WORKER times each within the window; then the supervisor stops and exits 1, rather than
    restarting them forever. Its signal handlers are the caller's again afterwards."""
    import signal

    from xraybatch import daemon
    from xraybatch.settings import load_settings

    monkeypatch.setattr(daemon, "RESTART_DELAY", 0.05)
    settings = load_settings(None, {"workdir": tmp_path, "db": {"auto_upgrade": False}}, environ={})
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level("WARNING", logger="xraybatch.daemon"):
        code = daemon.run_workers(["--version"], 2, settings)
    assert code == 1
    restarts = [r for r in caplog.records if "a new one starts" in r.getMessage()]
    assert len(restarts) == daemon.RESTART_LIMIT_PER_WORKER * 2  # each exit but the last one is replaced
    assert "giving up" in caplog.records[-1].getMessage()
    assert signal.getsignal(signal.SIGTERM) is before
