"""Find complete files in a drop folder. No DICOM logic: this module only yields paths.

A file is *complete* when its size and mtime have not changed for ``settle_seconds``. Names that senders use
while writing (``*.part``, ``*.tmp``, dot-files) are ignored until renamed. watchdog's inotify observer
reports events; a periodic scan of the folder (at start-up, and every ``rescan_seconds``) catches files that
arrived while the daemon was down and is the only source on network filesystems where inotify sees nothing
(``polling = true`` uses watchdog's polling observer instead).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from xraybatch.domain import file_ref
from xraybatch.settings import WatchConfig

logger = logging.getLogger(__name__)

_GONE_OR_UNCHANGED = (EVENT_TYPE_DELETED, EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in _GONE_OR_UNCHANGED:
            return
        # A move names the file only by its destination: the source is gone (taken by a worker, or renamed
        # from a temporary name); noting it would make a vanished file look like one still settling.
        raw = event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path
        if raw:
            self.watcher.note(Path(os.fsdecode(raw)))


class FolderWatcher:
    """Tracks candidate files under ``folder`` and hands out those that have settled.

    Use as a context manager; :meth:`ready` returns the complete files not handed out before.
    """

    def __init__(self, folder: Path, cfg: WatchConfig) -> None:
        self.folder = folder
        self.cfg = cfg
        self._seen: dict[Path, _Seen] = {}
        self._reported: set[Path] = set()  # entries that are not regular files, logged once each
        self._lock = threading.Lock()
        self._observer = PollingObserver(timeout=cfg.poll_seconds) if cfg.polling else Observer()
        self._last_scan = 0.0

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Handler(self), str(self.folder), recursive=True)
        self._observer.start()
        self.scan()
        return self

    def __exit__(self, *exc: object) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)

    def ignored(self, path: Path) -> bool:
        """Temporary names: any pattern of ``ignore_patterns`` matches the name or a parent folder's name."""
        parts = path.relative_to(self.folder).parts if path.is_relative_to(self.folder) else (path.name,)
        return any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in self.cfg.ignore_patterns)

    def note(self, path: Path) -> None:
        """Remember ``path`` as a candidate (an event or a scan saw it), unless it is gone already.

        Its size and mtime are taken now, so the settle time runs from the event, not from the next
        :meth:`ready`; a later event that finds them changed starts the settle time again.
        """
        if not path.is_relative_to(self.folder) or self.ignored(path):
            return
        try:
            st = path.lstat()
        except OSError:
            return  # gone already (renamed, taken by a worker)
        if not stat.S_ISREG(st.st_mode):
            self._report(path, st.st_mode)
            return
        with self._lock:
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, time.monotonic())

    def _report(self, path: Path, mode: int) -> None:
        """Log, once per path, an entry of the drop folder that is not a regular file: it is never opened."""
        if stat.S_ISDIR(mode):
            return  # a folder: its files are watched (recursively)
        with self._lock:
            if path in self._reported:
                return
            self._reported.add(path)
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else (
            "a socket" if stat.S_ISSOCK(mode) else "a device file")
        logger.warning("left %s in the drop folder: it is %s, and only regular files are taken in",
                       file_ref(path), kind, extra={"stage": "watch"})

    def scan(self) -> None:
        """Note every file under the folder (start-up, and a safety net for missed events)."""
        self._last_scan = time.monotonic()
        for dirpath, dirnames, filenames in os.walk(self.folder):
            dirnames[:] = [d for d in dirnames if not self.ignored(Path(dirpath) / d)]
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                self.note(Path(dirpath) / name)

    def pending(self) -> int:
        """Files seen that have not settled yet and are still there.

        A file can be gone without an event that says so: one handed out by :meth:`ready` and noted again by a
        late event of its own writing before a worker took it away.
        """
        with self._lock:
            for path in [p for p in self._seen if not p.exists()]:
                del self._seen[path]
            return len(self._seen)

    def next_wait(self) -> float:
        """Seconds until the next noted file could settle, at most ``poll_seconds``: how long to sleep.

        A caller that sleeps this long instead of ``poll_seconds`` hands out a file ``settle_seconds`` after its
        last change, not up to a poll later.
        """
        now = time.monotonic()
        with self._lock:
            due = [seen.stable_since + self.cfg.settle_seconds - now for seen in self._seen.values()]
        return max(0.05, min([self.cfg.poll_seconds, *due]))

    def ready(self) -> list[Path]:
        """Files whose size and mtime have been unchanged for ``settle_seconds``, each handed out once."""
        if time.monotonic() - self._last_scan >= self.cfg.rescan_seconds:
            self.scan()
        now = time.monotonic()
        out: list[Path] = []
        with self._lock:
            for path, seen in list(self._seen.items()):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._seen[path]  # renamed, moved or taken by another worker
                    continue
                if not stat.S_ISREG(st.st_mode):
                    del self._seen[path]  # replaced by a link or a FIFO meanwhile: never opened
                    continue
                if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                    self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
                elif now - seen.stable_since >= self.cfg.settle_seconds:
                    out.append(path)
                    del self._seen[path]
        return sorted(out)


def complete_files(folder: Path, cfg: WatchConfig, stop: threading.Event) -> Iterator[list[Path]]:
    """Yield lists of complete files (possibly empty, every ``poll_seconds``) until ``stop`` is set."""
    with FolderWatcher(folder, cfg) as watcher:
        while not stop.is_set():
            yield watcher.ready()
            stop.wait(watcher.next_wait())
