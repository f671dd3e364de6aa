"""`cli(*args)`: ``lowmem-analyze ARGS`` run in this process, for the tests that read its exit code,
stdout and stderr (on the test path through pyproject's ``pythonpath``)."""

import contextlib
import io

from lowmem.cli.main import main


def cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lowmem-analyze`` with `args` (each turned into a string)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
