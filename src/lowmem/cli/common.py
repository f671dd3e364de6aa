"""What every `lowmem-analyze` command shares: exit codes, the argument parser, error handling.

Exit codes (DESIGN §8): 0 done; 1 analysis finished but a requested bar was not met; 2 usage
error (bad flags, missing file, unreadable or mismatched plan, an output folder that cannot be
used: busy, holding files lowmem did not write, read-only, full); 3 the user's code failed or
broke the `model.py` contract; 4 internal error; 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
import warnings
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lowmem.cli.contract import UsageError
from lowmem.compress import Plan, PlanError
from lowmem.probe import TaskError
from lowmem.reports.html import write_report
from lowmem.reports.run import read_run
from lowmem.runfolder import ENVIRONMENT_ERRNOS, FolderError, RunFolder, environment_error

EXIT_OK, EXIT_BAR, EXIT_USAGE, EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

PROG = "lowmem-analyze"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep its format, add a hint
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for the options.\n")


def number(convert, accept, expected: str):
    """An argparse type: `convert` the text, refuse it unless `accept(value)`, naming `expected`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
positive_float = number(float, lambda v: 0 < v < float("inf"), "a positive finite number")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = number(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
fraction = number(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1")


def run_guarded(run: Callable[[Console], int], *, prog: str = PROG, quiet: bool = False, debug: bool = False,
                user_errors: tuple[type[BaseException], ...] = (TaskError,)) -> int:
    """Run a command, turning every failure into one message on stderr and its exit code.

    Args:
        run: the command; gets the stderr console, returns the exit code.
        prog: the name that starts every message.
        quiet: hide lowmem's own warnings.
        debug: show the traceback of a failure in the user's code.
        user_errors: exceptions that mean the user's code failed (exit 3).
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with warnings_to(err, quiet, prog), _sigterm_as_interrupt():
            return run(err)
    except (UsageError, PlanError, FolderError) as e:
        err.print(f"{prog}: error: {e}", markup=False)
        return EXIT_USAGE
    except user_errors as e:
        err.print(f"{prog}: error: {e}", markup=False)
        if debug:
            traceback.print_exc()
        return EXIT_USER
    except KeyboardInterrupt:
        err.print(f"{prog}: interrupted", markup=False)
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            return _internal(err, prog)
        # lowmem's own writes (the user's code reports as above): a full disk, a read-only folder.
        err.print(f"{prog}: error: {environment_error(e)}", markup=False)
        return EXIT_USAGE
    except Exception:
        return _internal(err, prog)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler stopping the job, `kill`) stops a command as Ctrl-C does: the run in
    progress ends cleanly, keeps what it measured, and the command exits 130."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:   # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal(err: Console, prog: str) -> int:
    err.print(f"{prog}: internal error (please report it with the traceback below)", markup=False)
    traceback.print_exc()
    return EXIT_INTERNAL


_LOWMEM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")


@contextlib.contextmanager
def warnings_to(err: Console, quiet: bool, prog: str = PROG):
    """lowmem's own warnings as one line without its source (none with -q); others as Python shows them."""
    with warnings.catch_warnings():
        python_shows = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if os.path.abspath(filename).startswith(_LOWMEM_DIR):
                err.print(f"{prog}: warning: {str(message).removeprefix('lowmem: ')}", markup=False)
            else:
                python_shows(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        if quiet:
            warnings.simplefilter("ignore")
        yield


def user_code():
    """While the user's code runs its print()s go to stderr: stdout carries the result only."""
    return contextlib.redirect_stdout(sys.stderr)


def load_plan_file(path: str | os.PathLike) -> Plan:
    """`Plan.load`, with a file that cannot be opened reported as a usage error."""
    try:
        return Plan.load(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such plan file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; give the plan.json file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the plan ({e.strerror})") from None


def parse_device(text: str) -> torch.device:
    """``--device``: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda, cuda:N, or another
    device torch can allocate on here (mps, xpu, …).

    Raises:
        UsageError: not a device, the meta device (shapes without values: nothing to train), or one
            this machine does not have; the message lists those it has.
    """
    def here() -> str:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            devices.append("mps")
        if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
            devices.append("xpu")
        return ", ".join(devices)

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device; use auto or one of: {here()}") from None
    if dev.type == "meta":
        raise UsageError("--device meta holds shapes without values, so nothing can be trained or measured on it; "
                         f"use one of: {here()}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text} requested but torch sees no CUDA GPU; use one of: {here()}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text} requested but torch sees {torch.cuda.device_count()} CUDA GPU(s); "
                         f"use one of: {here()}")
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=dev)
        except Exception:   # by backend: RuntimeError, NotImplementedError, AssertionError, ImportError…
            raise UsageError(f"--device {text} requested but torch has no {dev.type} device on this machine; "
                             f"use one of: {here()}") from None
    return dev


# torch.manual_seed's range is [-2**63, 2**64 - 1], negative seeds mapped onto positive ones
# (-1 is 2**64 - 1); the flag takes the unsigned range, so two spellings never mean one seed.
seed_int = number(int, lambda v: 0 <= v < 2 ** 64, "an integer from 0 to 2**64 - 1 (torch.manual_seed's range)")


def training_progress(err: Console, disable: bool) -> Progress:
    """The progress bar of a training loop on stderr: the task's description, steps done of
    total, the last loss (the task's ``loss`` field) and the time left; gone when it ends."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err, transient=True,
                    disable=disable)


def write_folder_report(folder: str | os.PathLike, note: Callable[[str], None], held: bool = False) -> None:
    """report.html of a run folder from its files. A failure here is a note, not an error: the
    results are on disk and ``lowmem-analyze report FOLDER`` makes the report again.

    Args:
        held: this process already holds the folder's lock (the analysis writing its own report).
    """
    try:
        path = write_report_html(read_run(folder), None, held)
    except Exception as e:
        note(f"report.html not written ({type(e).__name__}: {e}); '{PROG} report {folder}' retries it")
        return
    note(f"wrote {path}")


def write_report_html(run, path: str | os.PathLike | None = None, held: bool = False):
    """`write_report` at `path`, or in the run folder: only over a report.html lowmem wrote there,
    and under the folder's lock unless this process `held` it already.

    Raises:
        FolderBusy: another lowmem process writes the folder; FolderError: its report.html is not lowmem's.
    """
    with contextlib.ExitStack() as stack:
        if path is None:
            folder = RunFolder(run.folder, f"{PROG} report", lock=not held, flag="--html FILE")
            if not held:
                stack.enter_context(folder)
            folder.claim(["report.html"])
        return write_report(run, path)
