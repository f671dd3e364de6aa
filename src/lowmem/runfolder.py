"""The folders lowmem writes into: what it owns there, one writer at a time, and nothing lost.

Ownership. A folder lowmem writes into keeps a manifest, ``.lowmem.json``, naming the entries
(files or folders directly inside it) that lowmem wrote. lowmem only ever moves, replaces or
deletes entries the manifest names. A name a command is about to write that exists but is not in
the manifest is someone else's: the command is refused before it starts (`FolderError`).

One writer. ``.lowmem.lock`` holds the pid, host, command and start time of the process writing
the folder, under an advisory ``flock`` that the kernel drops when that process dies: a lock left
by a killed run is stale and taken over; a second live writer is refused at once (`FolderBusy`).

Nothing lost. A new run does not destroy the run before it until it has something better:
`RunFolder.begin` moves the earlier run's entries into ``.lowmem-replaced/``, and `RunFolder.settle`
moves them into ``previous/`` (replacing the run kept there) when the new run produced results, or
back in place when it produced none. A run killed in between (SIGKILL) is settled the same way by
the next `begin`. So a folder holds the newest run with results and, in ``previous/``, the one
before it. Where a kind of run says which runs finished (``finished``), an unfinished run (killed,
interrupted) never displaces a finished one: the finished run in ``previous/`` moves into
``previous/finished/`` and stays there until a newer finished run reaches ``previous/``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from lowmem.compress.plan import write_atomic

try:
    import fcntl
except ImportError:   # not POSIX: no advisory locks; ownership and the run swap still hold
    fcntl = None

MANIFEST = ".lowmem.json"
LOCK = ".lowmem.lock"
REPLACED = ".lowmem-replaced"
PREVIOUS = "previous"
FINISHED = "finished"
_SCHEMA = "lowmem.folder/1"
# errno values that mean the place or the machine, not lowmem: the user can fix them.
ENVIRONMENT_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                           errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                                           errno.EFBIG, errno.EIO, errno.ELOOP) if e is not None)


class FolderError(Exception):
    """An output folder that cannot be used: not a folder, not writable, full, or holding entries
    lowmem did not write (exit code 2)."""


class FolderBusy(FolderError):
    """Another live process is writing the folder."""


def environment_error(e: OSError, what: str = "write") -> FolderError:
    """An `OSError` of the file system (full disk, read-only, a file where a folder belongs) as a
    `FolderError` whose message names the path and the reason."""
    where = f" {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "the disk is full: free space or choose another --out",
            errno.EDQUOT: "the disk quota is used up: free space or choose another --out",
            errno.EROFS: "the file system is read-only: choose another --out",
            errno.EACCES: "permission denied: choose another --out",
            errno.EPERM: "permission denied: choose another --out",
            errno.ENOTDIR: "a file stands where a folder is needed: choose another --out",
            errno.EEXIST: "a file stands where a folder is needed: choose another --out"}.get(e.errno, "")
    return FolderError(f"cannot {what}{where}: {e.strerror or e}" + (f" ({hint})" if hint else ""))


def _read_manifest(folder: Path) -> list[str]:
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise FolderError(f"{folder / MANIFEST}: unreadable ({e}); lowmem cannot tell its own files there. "
                          "Choose another --out") from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(n, str) and _plain_name(n) for n in entries):
        raise FolderError(f"{folder / MANIFEST}: not a lowmem manifest; lowmem cannot tell its own files there. "
                          "Choose another --out")
    return entries


def _aside(kind: str) -> str:
    """The folder where a run of `kind` keeps the earlier run while it runs."""
    return REPLACED if kind == "run" else f"{REPLACED}-{kind}"


def _finished(kind: str) -> str:
    """The folder in ``previous/`` that keeps the last finished run of `kind` behind an unfinished one."""
    return FINISHED if kind == "run" else f"{FINISHED}-{kind}"


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST, LOCK) and "/" not in name and os.sep not in name


def _write_manifest(folder: Path, entries: Iterable[str], **extra) -> None:
    doc = {"schema": _SCHEMA, "about": "entries lowmem wrote in this folder; it changes only these",
           "entries": sorted(set(entries)), **extra}
    write_atomic(folder / MANIFEST, json.dumps(doc, indent=1) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class RunFolder:
    """An output folder, locked for this process (a context manager).

    Args:
        path: the folder; created (with its parents) when missing.
        command: what is writing it, for the lock file and the busy message.
        lock: take the lock (``report``, which only replaces its own ``report.html`` atomically,
            does without).
        flag: how the user chose the folder, for the messages (``--out``).

    Raises:
        FolderError: `path` is a file or lies under one, cannot be created or written.
        FolderBusy: another live process holds the lock.
    """

    def __init__(self, path: str | os.PathLike, command: str = "lowmem", lock: bool = True, flag: str = "--out"):
        self.path = Path(path)
        self.flag = flag   # how the user named the folder, for messages
        self.command = command
        self._want_lock = lock
        self._lock_fd: int | None = None
        self.stale_holder: str | None = None   # what a lock left by a killed process said, once taken over

    # -- the lock --------------------------------------------------------------------------------

    def __enter__(self) -> "RunFolder":
        if self.path.is_symlink() and not self.path.exists():
            raise FolderError(f"{self.flag} {self.path} is a broken symlink (to {os.readlink(self.path)}); give a folder")
        if self.path.exists() and not self.path.is_dir():
            raise FolderError(f"{self.flag} {self.path} is a file, not a folder; give a folder (it is created when missing)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise environment_error(e, "create the folder") from None
        if self._want_lock:
            self._lock()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock(self) -> None:
        path = self.path / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise FolderError(f"{path} is a symlink, which lowmem did not make; it never writes through "
                                      f"one. Remove it, or choose another {self.flag}") from None
                raise environment_error(e, "write to") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FolderError(f"{path} is not a file; lowmem keeps its lock there. Remove it, or choose "
                                  f"another {self.flag}")
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise environment_error(e, "lock") from None
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderBusy(f"{self.path} is in use by {holder}; wait for it to finish, or choose another "
                                 f"{self.flag}")
            # The holder before us may have removed the file between our open and our lock: then we
            # hold a lock on a file nobody else can see; take the one at the path instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd, raw=True)
        self._lock_fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:
            self.release()
            raise environment_error(e, "write to") from None
        self.stale_holder = stale or None   # a lock a killed process left behind, taken over

    def release(self) -> None:
        """Drop the lock and remove the lock file (only while holding it, so never another's)."""
        if self._lock_fd is None:
            return
        self._forget_unwritten()
        try:
            (self.path / LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- ownership -------------------------------------------------------------------------------

    def owned(self, folder: Path | None = None) -> list[str]:
        """Names of the entries lowmem wrote in `folder` (default this folder)."""
        return _read_manifest(self.path if folder is None else folder)

    def foreign(self, names: Iterable[str]) -> list[str]:
        """Those of `names` that exist here but were not written by lowmem."""
        mine = set(self.owned())
        return [n for n in names if n not in mine and _lexists(self.path / n)]

    def check(self, names: Iterable[str], why: str = "") -> None:
        """Refuse before a run starts when any of `names` exists here and lowmem did not write it.

        Raises:
            FolderError: naming the entries that belong to someone else.
        """
        theirs = self.foreign(dict.fromkeys(names))
        if theirs:
            listed = ", ".join(theirs)
            raise FolderError(f"{self.path} already holds {listed}, which lowmem did not write here{why} "
                              f"(nothing in {MANIFEST} says so: your own files, or an older lowmem's); "
                              f"lowmem never overwrites or deletes files it did not write. Move "
                              f"{'it' if len(theirs) == 1 else 'them'} away, or choose another "
                              f"{self.flag}")

    def claim(self, names: Iterable[str], why: str = "") -> None:
        """Record `names` as lowmem's right before writing them (`check` first).

        Raises:
            FolderError: naming the entries that belong to someone else.
        """
        names = list(dict.fromkeys(names))
        self.check(names, why)
        mine = self.owned()
        if not set(names) <= set(mine):
            try:
                _write_manifest(self.path, [*mine, *names])
            except OSError as e:
                raise environment_error(e) from None

    def _forget_unwritten(self) -> None:
        """Drop names claimed but never written (a run that failed first): a file the user puts
        there later is the user's."""
        try:
            mine = self.owned()
            there = [n for n in mine if _lexists(self.path / n)]
            if there != mine:
                _write_manifest(self.path, there)
        except (OSError, FolderError):
            pass

    # -- one run replacing another ---------------------------------------------------------------

    def begin(self, names: Iterable[str], useful: Useful, writes: Iterable[str] | None = None,
              kind: str = "run", finished: Useful | None = None) -> None:
        """Start a run that writes `names`: set aside the earlier run's entries among them.

        Args:
            names: every entry a run of this kind may leave; the earlier run's are set aside, so
                none of them is shown with the new run.
            useful: ``useful(folder, names)``, whether `folder` holds results worth keeping among
                `names` (a plan, measurements, finished runs).
            writes: those of `names` this run will write (default all): they must not belong to
                someone else. The others may be the user's and are left where they are.
            kind: what kind of run (an analysis, a sweep, Hessian blocks): each kind sets its
                earlier run aside in a folder of its own and settles only its own.
            finished: ``finished(folder, names)``, whether the run in `folder` ran to its end
                (see `settle`); default: every run with results counts as finished.
        """
        names = list(dict.fromkeys(names))
        aside_name = _aside(kind)
        self.check([*(names if writes is None else writes), aside_name, PREVIOUS])
        behind = self.path / PREVIOUS / _finished(kind)
        if finished is not None and _lexists(behind) and _finished(kind) not in self.owned(behind.parent):
            raise FolderError(f"{behind} is not a folder lowmem made; lowmem keeps a finished run there when an "
                              f"unfinished one takes its place. Move it away, or choose another {self.flag}")
        self.settle(useful, kind, finished)
        mine = set(self.owned())
        present = [n for n in names if n in mine and _lexists(self.path / n)]
        if not present:
            return
        aside = self.path / aside_name
        try:
            if not useful(self.path, names):   # an earlier run without results (it failed or was killed early)
                for n in present:
                    _remove(self.path / n)
                return
            self.claim([aside_name])
            aside.mkdir()
            # Recorded before anything moves, so a run stopped at any point is settled from the record.
            _write_manifest(aside, present, replaces=names, complete=False)
            for n in present:
                os.replace(self.path / n, aside / n)
            _write_manifest(aside, present, replaces=names, complete=True)
        except OSError as e:
            raise environment_error(e, "set aside the earlier run in") from None

    def settle(self, useful: Useful, kind: str = "run", finished: Useful | None = None) -> str | None:
        """End the run of `kind` that set entries aside (this one, or one that was stopped): keep
        it when it has results (the entries set aside go to ``previous/``), else put them back.
        With `finished` given, an unfinished run set aside does not displace a finished run from
        ``previous/``: that one moves into ``previous/finished/`` (and a finished run reaching
        ``previous/`` replaces both).

        Every stage is recorded in the aside folder's manifest before it is carried out, so a
        settle stopped half-way is finished by the next one without losing or repeating anything.

        Returns:
            "kept" or "restored", None when nothing was set aside.
        """
        aside = self.path / _aside(kind)
        if aside.name not in self.owned() or aside.is_symlink() or not aside.is_dir():
            return None   # nothing set aside (a folder of that name that lowmem did not make is left alone)
        try:
            doc = json.loads((aside / MANIFEST).read_text())
            names, listed = list(doc["replaces"]), _read_manifest(aside)
        except FileNotFoundError:   # stopped before its record was written: nothing was moved
            _clear(aside)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise FolderError(f"{aside / MANIFEST}: unreadable; it holds an earlier run lowmem set aside. Move "
                              f"its entries back into {self.path} by hand, then remove {aside}") from None
        held = [n for n in listed if _lexists(aside / n)]
        try:
            outcome = doc.get("outcome")
            if outcome is None:
                if not doc.get("complete"):       # the new run never started: nothing here is its
                    outcome, doc["cleared"] = "restored", True
                else:
                    outcome = "kept" if useful(self.path, names) else "restored"
                doc["outcome"] = outcome
                _record(aside, listed, doc)
            if outcome == "kept":
                self._keep(aside, names, listed, held, doc, finished, kind)
            else:
                self._restore(aside, names, listed, held, doc)
            _clear(aside)
        except OSError as e:
            raise environment_error(e, "settle the earlier run in") from None
        return outcome

    def _keep(self, aside: Path, names: list[str], listed: list[str], held: list[str], doc: dict,
              finished: Useful | None = None, kind: str = "run") -> None:
        """The entries set aside replace the run in ``previous/``, whole (a finished one there
        behind an unfinished one set aside: into ``previous/finished/``, see `settle`)."""
        prev = self.path / PREVIOUS
        if prev.is_symlink() or (prev.exists() and not prev.is_dir()):
            raise FolderError(f"{prev} is not a folder lowmem made; it keeps the earlier run in {aside}. Move "
                              f"{prev} away and run again")
        self.claim([PREVIOUS])
        prev.mkdir(exist_ok=True)
        kept = self.owned(prev)
        theirs = [n for n in held if _lexists(prev / n) and n not in kept]
        if theirs:
            raise FolderError(f"{prev} holds {', '.join(theirs)}, which lowmem did not write; it keeps the earlier "
                              f"run in {aside}. Move them away and run again")
        if not doc.get("cleared"):
            gone = list(names)           # the run before the one set aside
            if finished is not None:
                if finished(aside, names):   # a finished run also replaces the one kept behind the run before
                    gone.append(_finished(kind))
                elif self._keep_finished(prev, names, kept, doc, finished, kind, aside, listed):
                    kept = self.owned(prev)
            for n in gone:
                if n in kept:
                    _remove(prev / n)
            kept = [n for n in kept if n not in gone]
            _write_manifest(prev, kept)
            doc["cleared"] = True
            _record(aside, listed, doc)
        _write_manifest(prev, [*kept, *held])   # listed before they move: a name is never unowned
        for n in held:
            os.replace(aside / n, prev / n)

    def _keep_finished(self, prev: Path, names: list[str], kept: list[str], doc: dict, finished: Useful,
                       kind: str, aside: Path, listed: list[str]) -> bool:
        """Move a finished run in `prev` into its ``finished/`` folder, behind the unfinished one
        about to take its place; whether it did. The choice is recorded (in the aside folder's
        manifest) before anything moves, so a move stopped half-way is finished the same way."""
        fin = prev / _finished(kind)
        if "finishing" not in doc:
            here = [n for n in names if n in kept and _lexists(prev / n)]
            doc["finishing"] = bool(here) and finished(prev, names)
            if doc["finishing"] and _finished(kind) in kept:
                _remove(fin)             # an older finished run, behind an unfinished one: this one is newer
                kept = [n for n in kept if n != _finished(kind)]
                _write_manifest(prev, kept)
            _record(aside, listed, doc)
        if not doc["finishing"]:
            return False
        if _lexists(fin) and _finished(kind) not in kept:
            raise FolderError(f"{fin} is not a folder lowmem made; it would keep the finished run now in {prev}. "
                              f"Move {fin} away and run again")
        moving = [n for n in names if n in kept and _lexists(prev / n)]
        _write_manifest(prev, [*kept, _finished(kind)])   # listed before it is made
        fin.mkdir(exist_ok=True)
        _write_manifest(fin, [*self.owned(fin), *moving])
        for n in moving:
            os.replace(prev / n, fin / n)
        _write_manifest(prev, [n for n in self.owned(prev) if n not in moving])
        return True

    def _restore(self, aside: Path, names: list[str], listed: list[str], held: list[str], doc: dict) -> None:
        """The new run has nothing: its leftovers go, the earlier run returns as it was."""
        if not doc.get("cleared"):
            mine = set(self.owned())
            for n in names:
                if n in mine:
                    _remove(self.path / n)
            doc["cleared"] = True
            _record(aside, listed, doc)
        self.claim([n for n in held if not _lexists(self.path / n)])   # listed again before they move back
        for n in held:
            if not _lexists(self.path / n):
                os.replace(aside / n, self.path / n)


Useful = Callable[[Path, list], bool]
_MANIFEST_KEYS = ("schema", "about", "entries")


def _record(aside: Path, listed: list[str], doc: dict) -> None:
    """Write the aside folder's manifest with the stage `doc` has reached (its own keys, with the
    entries `listed`), before that stage is carried out."""
    _write_manifest(aside, listed, **{k: v for k, v in doc.items() if k not in _MANIFEST_KEYS})


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _clear(aside: Path) -> None:
    """Remove an aside folder once its entries are gone: its record and temporaries only, so a
    folder still holding anything else stays."""
    for p in (aside / MANIFEST, *aside.glob(f".{MANIFEST}.*.tmp")):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        aside.rmdir()


def _read_holder(fd: int, raw: bool = False) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        info = json.loads(text) if text else {}
    except (OSError, ValueError):
        info = {}
    if raw:
        return text if info else ""
    if not isinstance(info, dict) or "pid" not in info:
        return "another lowmem process"
    where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return (f"{info.get('command', 'lowmem')} (pid {info.get('pid')}{where}, started {info.get('started', '?')})")


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """A file the user named for lowmem to write (``--plan-out``, ``--html``): its folder must exist
    or be creatable, and it must not be a folder.

    Raises:
        FolderError: naming the flag and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise FolderError(f"{flag} {path} is a folder; give the file to write, e.g. {path / 'plan.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"{flag} {path}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise FolderError(f"{flag} {path}: its folder is not writable")
    return path


if __name__ == "__main__":   # a demo: two writers, the second refused
    with RunFolder(sys.argv[1] if len(sys.argv) > 1 else "lowmem-demo", "demo") as f:
        print("holding", f.path / LOCK, (f.path / LOCK).read_text().strip())
        try:
            RunFolder(f.path, "second").__enter__()
        except FolderBusy as e:
            print("second writer:", e)
