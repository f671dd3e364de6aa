"""SNR trajectories on disk: a CSV streamed one measurement at a time, and its reader.

Header: ``step,name,shape,view,subset,snr,mean_sq,var`` (DESIGN §3). ``shape`` is the parameter's
shape (``256x256``), ``view`` the view's name and shape (``heads:4x64x256``), ``subset`` the
view's dims averaged over (``0,1``); `lowmem.snr.keys` writes and parses these three, and a
`Sample` holds them typed.

The writer streams into ``<path>.part`` and flushes after every measurement, so a killed run
keeps every sample it took; `close` renames it to ``<path>`` in one atomic step, so a reader of
``<path>`` never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lowmem.snr.keys import ViewLabel, format_shape, format_subset, parse_shape, parse_subset

HEADER = ("step", "name", "shape", "view", "subset", "snr", "mean_sq", "var")


class TrajectoryError(ValueError):
    """A trajectory file that cannot be read; the message says where."""


@dataclass(frozen=True)
class Sample:
    """One row of the trajectory: the SNR of one parameter's view along one subset at one step."""

    step: int
    name: str
    shape: tuple[int, ...]     # the parameter's
    view: ViewLabel
    subset: tuple[int, ...]    # dims of the view
    snr: float
    mean_sq: float
    var: float


class TrajectoryWriter:
    """Append measurements to a trajectory CSV; see the module docstring for the file protocol.

    A write that fails (a full disk) is undone: the file is cut back to the end of the last whole
    measurement, closed and left as ``<path>.part``, and the `OSError` says how many it keeps.
    """

    header = HEADER

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".part")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "wb", buffering=0)   # unbuffered: a failed write is undone exactly
        self.rows = 0
        self.measurements = 0
        self._put([self.header])

    def write(self, samples: Iterable) -> None:
        """Write one measurement's samples, in one write to the OS."""
        rows = [self._row(s) for s in samples]
        self._put(rows)
        self.rows += len(rows)
        self.measurements += 1

    @staticmethod
    def _row(s: Sample) -> tuple:
        return (s.step, s.name, format_shape(s.shape), str(s.view), format_subset(s.subset),
                _fmt(s.snr), _fmt(s.mean_sq), _fmt(s.var))

    def _put(self, rows) -> None:
        if self._file.closed:
            raise ValueError(f"{self.partial} is closed")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        data = memoryview(buf.getvalue().encode())
        start = self._file.tell()
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as e:
            try:
                os.ftruncate(self._file.fileno(), start)
            finally:
                self._file.close()
            raise OSError(e.errno, f"{e.strerror}; it keeps the {self.measurements} measurement(s) written before "
                                   "this one, each whole", str(self.partial)) from None

    def close(self) -> Path:
        """Finish the file and move it into place; safe to call twice. After a failed write the
        file stays ``<path>.part`` (and that is returned)."""
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial, self.path)
            return self.path
        return self.path if self.path.exists() and not self.partial.exists() else self.partial


def _fmt(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "nan"


def read_trajectory(path: str | os.PathLike) -> list[Sample]:
    """Read a trajectory CSV (also a ``.part`` file a killed run left; its torn last line is dropped).

    Raises:
        TrajectoryError: naming the file and line of the first malformed row.
    """
    path = Path(path)
    samples = []
    # A file repeats a few shapes, views and subsets many times: each text is parsed once.
    shapes, views, subsets = _Parsed(parse_shape), _Parsed(ViewLabel.parse), _Parsed(parse_subset)
    for lineno, row in read_rows(path, HEADER):
        try:
            samples.append(Sample(int(row[0]), row[1], shapes[row[2]], views[row[3]], subsets[row[4]],
                                  float(row[5]), float(row[6]), float(row[7])))
        except ValueError as e:
            raise TrajectoryError(f"{path}: line {lineno}: {e}") from None
    return samples


def read_rows(path: Path, header: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each row of a streamed CSV after its `header`: the last line
    dropped when a killed writer tore it, empty lines skipped.

    Raises:
        TrajectoryError: the header is not `header`, or a row has another number of fields (the
            message names the file and line).
    """
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith(("\n", "\r")):
        # The writer ends every row with a line break, so an unterminated last line is one a killed
        # writer tore (possibly inside a number that still parses): drop it.
        text = text[:text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text, newline=""))
    found = next(reader, None)
    if found is None or tuple(found) != header:
        raise TrajectoryError(f"{path}: line 1: expected header {','.join(header)}, found {found}")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise TrajectoryError(f"{path}: line {lineno}: expected {len(header)} fields, found {len(row)}")
        rows.append((lineno, row))
    return rows


class _Parsed(dict):
    """``parsed[text]``: ``parse(text)``, computed once per distinct text."""

    def __init__(self, parse):
        super().__init__()
        self._parse = parse

    def __missing__(self, text: str):
        value = self[text] = self._parse(text)
        return value


# (parameter name, view, dims of the view): one series of a trajectory.
SeriesKey = tuple[str, ViewLabel, tuple[int, ...]]


@dataclass(frozen=True)
class MeanSnr:
    """Time-mean SNR of one (name, view, subset) over the measurements in a window."""

    snr: float
    samples: int


class SnrTrajectory:
    """All samples of a run, indexed for the plan builders."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    @classmethod
    def read(cls, path: str | os.PathLike) -> "SnrTrajectory":
        return cls(read_trajectory(path))

    @property
    def steps(self) -> list[int]:
        return sorted({s.step for s in self.samples})

    def time_mean(self, window: tuple[int | None, int | None] | None = None) -> dict[SeriesKey, MeanSnr]:
        """Mean SNR over the measured steps in ``[start, end]`` (inclusive), non-finite samples skipped.

        Returns:
            ``{(name, view, subset): MeanSnr}``.
        """
        start, end = window if window else (None, None)
        sums: dict[SeriesKey, list[float]] = {}
        for s in self.samples:
            if (start is not None and s.step < start) or (end is not None and s.step > end):
                continue
            if not math.isfinite(s.snr):
                continue
            acc = sums.setdefault((s.name, s.view, s.subset), [0.0, 0])
            acc[0] += s.snr
            acc[1] += 1
        return {k: MeanSnr(total / n, n) for k, (total, n) in sums.items()}

    def final(self) -> dict[SeriesKey, float]:
        """SNR at the last measured step of each (name, view, subset)."""
        last: dict[SeriesKey, Sample] = {}
        for s in self.samples:
            key = (s.name, s.view, s.subset)
            if key not in last or s.step >= last[key].step:
                last[key] = s
        return {k: s.snr for k, s in last.items()}
