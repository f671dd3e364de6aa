"""lowmem.runfolder's swap of one run for another, stopped at every step it takes: whatever the
point, the next settle leaves each run whole, byte for byte, and nothing unowned is touched."""

from __future__ import annotations

import os

import pytest

from lowmem import runfolder
from lowmem.runfolder import FINISHED, MANIFEST, PREVIOUS, REPLACED, FolderError, RunFolder

NAMES = ["layers.json", "plan.json", "snr.csv"]


def useful(folder, names):
    return (folder / "plan.json").is_file()


def files(folder):
    """Every file under `folder` but lowmem's own records, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}


def write_run(folder, tag: str, with_plan: bool = True):
    f = RunFolder(folder)
    names = NAMES if with_plan else NAMES[:1]
    f.claim(names)
    for n in names:
        (folder / n).write_text(f"{tag} {n}\n")


class Stop(BaseException):
    """A signal arriving between two steps (Ctrl-C, SIGTERM: both raise in Python)."""


def stop_at(monkeypatch, k: int):
    """Make the k-th file-system move or removal from now on raise `Stop` before it happens."""
    calls = {"n": 0}
    real_replace, real_remove = os.replace, runfolder._remove

    def counted(real):
        def step(*args):
            calls["n"] += 1
            if calls["n"] == k:
                raise Stop
            return real(*args)
        return step

    monkeypatch.setattr(runfolder.os, "replace", counted(real_replace))
    monkeypatch.setattr(runfolder, "_remove", counted(real_remove))
    return lambda: monkeypatch.undo()


@pytest.mark.parametrize("k", range(1, 8))
def test_a_begin_stopped_anywhere_puts_the_earlier_run_back_whole(tmp_path, monkeypatch, k):
    write_run(tmp_path, "A")
    (tmp_path / "notes.txt").write_text("mine\n")
    before = files(tmp_path)
    undo = stop_at(monkeypatch, k)
    try:   # past the last step, begin finishes and the new run stops at once with nothing
        RunFolder(tmp_path).begin(NAMES, useful)
    except Stop:
        pass
    undo()
    assert RunFolder(tmp_path).settle(useful) in ("restored", None)
    assert files(tmp_path) == before
    assert not (tmp_path / REPLACED).exists()


@pytest.mark.parametrize("new_has_results", [True, False])
@pytest.mark.parametrize("k", range(1, 12))
def test_a_settle_stopped_anywhere_is_finished_by_the_next(tmp_path, monkeypatch, k, new_has_results):
    write_run(tmp_path, "A")
    RunFolder(tmp_path).begin(NAMES, useful)
    write_run(tmp_path, "B")                     # the run B that replaced A; it is replaced by C below
    (tmp_path / "notes.txt").write_text("mine\n")
    RunFolder(tmp_path).settle(useful)
    a_in_previous, b = files(tmp_path / PREVIOUS), files(tmp_path)
    RunFolder(tmp_path).begin(NAMES, useful)     # C starts: B set aside
    write_run(tmp_path, "C", with_plan=new_has_results)
    c = files(tmp_path)
    undo = stop_at(monkeypatch, k)
    try:
        RunFolder(tmp_path).settle(useful)
    except Stop:
        pass
    undo()
    RunFolder(tmp_path).settle(useful)
    assert not (tmp_path / REPLACED).exists()
    if new_has_results:   # C stays, B is the run before it, A is gone (two generations)
        assert files(tmp_path) == {**{k: v for k, v in c.items() if not k.startswith(REPLACED)},
                                   **{f"{PREVIOUS}/{k}": v for k, v in b.items() if "/" not in k and k != "notes.txt"}}
    else:                 # C had nothing: B is back as it was, A still the run before it
        assert files(tmp_path) == {**b, **{f"{PREVIOUS}/{k}": v for k, v in a_in_previous.items()}}
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_previous_holding_the_users_file_is_never_written_over(tmp_path):
    write_run(tmp_path, "A")
    RunFolder(tmp_path).begin(NAMES, useful)
    write_run(tmp_path, "B")
    RunFolder(tmp_path).claim([PREVIOUS])
    (tmp_path / PREVIOUS).mkdir()
    (tmp_path / PREVIOUS / "plan.json").write_text("mine\n")
    with pytest.raises(FolderError, match="plan.json, which lowmem did not write"):
        RunFolder(tmp_path).settle(useful)
    assert (tmp_path / PREVIOUS / "plan.json").read_text() == "mine\n"
    assert (tmp_path / REPLACED / "plan.json").read_text() == "A plan.json\n"   # A waits, whole


def finished(folder, names):
    """A finished run has its snr.csv; a run killed or interrupted after its first results has
    a plan but no snr.csv (as `write_unfinished` leaves it)."""
    return (folder / "snr.csv").is_file()


def write_unfinished(folder, tag: str):
    f = RunFolder(folder)
    f.claim(NAMES[:2])
    for n in NAMES[:2]:
        (folder / n).write_text(f"{tag} {n}\n")


def run(folder, write, tag):
    """One whole run: the earlier one set aside, this one written, then settled."""
    RunFolder(folder).begin(NAMES, useful, finished=finished)
    write(folder, tag)
    RunFolder(folder).settle(useful, finished=finished)


def test_an_unfinished_run_never_pushes_a_finished_one_out(tmp_path):
    # A finished; B killed after its first results; C finished: C, B in previous/, and A (the last
    # finished run before) in previous/finished/, byte for byte, where two generations dropped it
    run(tmp_path, write_run, "A")
    a = files(tmp_path)
    run(tmp_path, write_unfinished, "B")
    b = files(tmp_path)
    assert files(tmp_path / PREVIOUS) == a
    run(tmp_path, write_run, "C")
    assert files(tmp_path / PREVIOUS) == {**{k: v for k, v in b.items() if "/" not in k},
                                          **{f"{FINISHED}/{k}": v for k, v in a.items()}}
    # D unfinished: C (finished) goes to previous/; A's place behind it is no longer needed
    run(tmp_path, write_unfinished, "D")
    c_files = {n: f"C {n}\n".encode() for n in NAMES}
    assert files(tmp_path / PREVIOUS) == c_files
    # E unfinished too: D replaces C in previous/, C is kept behind it; then F finished: E in
    # previous/, C still behind it; G finished: F in previous/ and nothing behind it
    run(tmp_path, write_unfinished, "E")
    d_files = {n: f"D {n}\n".encode() for n in NAMES[:2]}
    assert files(tmp_path / PREVIOUS) == {**d_files, **{f"{FINISHED}/{k}": v for k, v in c_files.items()}}
    run(tmp_path, write_run, "F")
    e_files = {n: f"E {n}\n".encode() for n in NAMES[:2]}
    assert files(tmp_path / PREVIOUS) == {**e_files, **{f"{FINISHED}/{k}": v for k, v in c_files.items()}}
    run(tmp_path, write_run, "G")
    assert files(tmp_path / PREVIOUS) == {n: f"F {n}\n".encode() for n in NAMES}
    assert files(tmp_path) == {**{n: f"G {n}\n".encode() for n in NAMES},
                               **{f"{PREVIOUS}/{n}": f"F {n}\n".encode() for n in NAMES}}
    assert not (tmp_path / PREVIOUS / FINISHED).exists()


@pytest.mark.parametrize("k", range(1, 10))
def test_keeping_the_finished_run_stopped_anywhere_is_finished_by_the_next_settle(tmp_path, monkeypatch, k):
    run(tmp_path, write_run, "A")
    a = files(tmp_path)
    run(tmp_path, write_unfinished, "B")
    b = files(tmp_path)
    RunFolder(tmp_path).begin(NAMES, useful, finished=finished)   # C starts: B set aside
    write_run(tmp_path, "C")
    undo = stop_at(monkeypatch, k)
    try:
        RunFolder(tmp_path).settle(useful, finished=finished)
    except Stop:
        pass
    undo()
    RunFolder(tmp_path).settle(useful, finished=finished)
    assert not (tmp_path / REPLACED).exists()
    assert files(tmp_path) == {**{n: f"C {n}\n".encode() for n in NAMES},
                               **{f"{PREVIOUS}/{k}": v for k, v in b.items() if "/" not in k},
                               **{f"{PREVIOUS}/{FINISHED}/{k}": v for k, v in a.items()}}


def test_a_finished_folder_lowmem_did_not_make_is_never_written_into(tmp_path):
    run(tmp_path, write_run, "A")
    run(tmp_path, write_unfinished, "B")
    mine = tmp_path / PREVIOUS / FINISHED
    mine.mkdir()
    (mine / "mine.txt").write_text("mine\n")
    before = files(tmp_path)
    # there before a run: refused at once, nothing moved
    with pytest.raises(FolderError, match="not a folder lowmem made"):
        RunFolder(tmp_path).begin(NAMES, useful, finished=finished)
    assert files(tmp_path) == before
    # made while a run ran: A is finished and B is not, but previous/finished/ is the user's, so
    # the settle moves nothing and A waits
    (mine / "mine.txt").unlink()
    mine.rmdir()
    RunFolder(tmp_path).begin(NAMES, useful, finished=finished)
    write_run(tmp_path, "C")
    mine.mkdir()
    (mine / "mine.txt").write_text("mine\n")
    with pytest.raises(FolderError, match="not a folder lowmem made"):
        RunFolder(tmp_path).settle(useful, finished=finished)
    assert (mine / "mine.txt").read_text() == "mine\n"
    assert (tmp_path / PREVIOUS / "snr.csv").read_text() == "A snr.csv\n"
