"""Load a task from ``model.py[:factory]`` or a built-in example (the contract of DESIGN §7)."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from pathlib import Path

from lowmem.examples import EXAMPLES
from lowmem.probe import Task, TaskError, user_failure

REQUIRED = ("build_model", "get_batch", "loss_fn")
OPTIONAL = ("build_optimizer", "get_val_batch")
DEFAULT_KEYS = {"steps": int, "lr": float, "every": int}
# The rules of the flags that override them (--steps, --lr, --every).
_DEFAULT_RULES = {"steps": (lambda v: v >= 1, "a positive integer"),
                  "lr": (lambda v: 0 < v < math.inf, "a positive finite number"),
                  "every": (lambda v: v >= 1, "a positive integer")}


class UsageError(ValueError):
    """The command line itself is wrong (exit code 2)."""


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, [c for c in candidates if not c.startswith("__")], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_example(name: str) -> Task:
    if name not in EXAMPLES:
        raise UsageError(f"unknown example {name!r}; built-in examples: {', '.join(EXAMPLES)}.{_did_you_mean(name, EXAMPLES)}")
    module = importlib.import_module(EXAMPLES[name])
    return _task_from(module, f"example {name!r}")


def load_task(target: str) -> Task:
    """Import ``model.py`` (not as ``__main__``) and read the contract from it or its factory."""
    path_text, _, factory = target.partition(":")
    path = Path(path_text)
    _check_file(path, path_text)
    module_name = f"_lowmem_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path_text}: cannot be imported as a Python file (expected a .py file)")
    if b"\0" in path.read_bytes():   # Python's own message names no line ("line None")
        raise TaskError(f"{path_text}: the file contains null bytes (is it a binary file?); give the Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[module_name] = module
    try:
        with _own_argv(path):
            spec.loader.exec_module(module)
    except SyntaxError as e:   # in model.py, or in a module it imports
        file = path_text if e.filename in (None, str(path), str(path.resolve())) else e.filename
        raise TaskError(f"{file}: line {e.lineno}: syntax error: {e.msg}") from e
    except SystemExit as e:
        raise TaskError(f"{path_text} exited while being imported (sys.exit({e.code!r})){_frames(e, path)}\n"
                        "lowmem imports it to call build_model, get_batch and loss_fn, so it must not parse the "
                        "command line or train at import: argument parsing (argparse) and the training script "
                        "belong under `if __name__ == \"__main__\":`") from e
    except Exception as e:
        raise TaskError(f"importing {path_text} raised {type(e).__name__}: {e}{_frames(e, path)}") from e
    source = str(path_text)
    if factory:
        fn = getattr(module, factory, None)
        if fn is None:
            names = [n for n in vars(module) if callable(getattr(module, n))]
            raise TaskError(f"{path_text} has no function {factory!r}.{_did_you_mean(factory, names)}")
        if not callable(fn):
            raise TaskError(f"{path_text}:{factory} is a {type(fn).__name__}, expected a function returning the task")
        try:
            with _own_argv(path):
                obj = fn()
        except (KeyboardInterrupt, TaskError):
            raise
        except (Exception, SystemExit) as e:
            raise user_failure(f"{factory}()", path_text, e) from e
        source = f"{path_text}:{factory}"
        if not any(callable(getattr(obj, n, None)) for n in REQUIRED):
            hint = " (for a dict, return types.SimpleNamespace(**d))" if isinstance(obj, dict) else ""
            raise TaskError(f"{source}() returned {'None' if obj is None else 'a ' + type(obj).__name__}: a factory "
                            "must return an object with build_model, get_batch and loss_fn as attributes (a module, "
                            f"a class instance or a types.SimpleNamespace){hint}")
        return _task_from(obj, source)
    return _task_from(module, source)


def _check_file(path: Path, path_text: str) -> None:
    """Usage errors for a `model.py` that is not a readable file, with a hint where one helps."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{path_text}: is a broken symlink pointing to {os.readlink(path)}, which does not exist")
    if not path.exists():
        raise UsageError(f"{path_text}: no such file.{_did_you_mean_file(path, path_text)}")
    if path.is_dir():
        raise UsageError(f"{path_text}: is a folder; give the Python file that defines build_model, get_batch and loss_fn")
    if not path.is_file():
        raise UsageError(f"{path_text}: is not a regular file; give the Python file that defines build_model, "
                         "get_batch and loss_fn")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{path_text}: cannot be read ({e.strerror})") from None


def _did_you_mean_file(path: Path, path_text: str) -> str:
    """A command's name for a bare word close to one (``reprot``), else a near ``.py`` file beside it."""
    if "/" not in path_text and not path.suffix:
        from lowmem.cli.main import SUBCOMMANDS   # here: main imports this module
        close = difflib.get_close_matches(path_text, list(SUBCOMMANDS), n=1, cutoff=0.6)
        if close:
            return f" Did you mean the command {close[0]!r}?"
    if not path.parent.is_dir():
        return ""
    return _did_you_mean(path.name, [p.name for p in path.parent.glob("*.py") if p.name != path.name])


@contextlib.contextmanager
def _own_argv(path: Path):
    """``sys.argv`` as if the user's file were the program, without lowmem's flags, while its code
    runs outside a function of the contract: a parser at import then sees no foreign arguments."""
    argv = sys.argv
    sys.argv = [str(path)]
    try:
        yield
    finally:
        sys.argv = argv


def _frames(e: BaseException, path: Path) -> str:
    """The frames of `e`'s traceback in the user's file, on their own lines (empty if none)."""
    import traceback
    names = (str(path), str(path.resolve()))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in names]
    where = "".join(traceback.format_list(frames[-2:])).rstrip()
    return f"\n{where}" if where else ""


def _task_from(obj, source: str) -> Task:
    names = dir(obj)
    missing = [n for n in REQUIRED if not callable(getattr(obj, n, None))]
    if missing:
        lines = []
        for n in missing:
            found = getattr(obj, n, None)
            what = f"found a {type(found).__name__}, expected a function" if found is not None else "not found"
            lines.append(f"  {n}: {what}.{_did_you_mean(n, names)}")
        raise TaskError(f"{source} does not follow the model.py contract:\n" + "\n".join(lines) +
                        "\nIt must define build_model() -> nn.Module, get_batch(step) and loss_fn(model, batch) -> scalar tensor.")
    build_optimizer = getattr(obj, "build_optimizer", None)
    if build_optimizer is not None and not callable(build_optimizer):
        raise TaskError(f"{source}: build_optimizer is a {type(build_optimizer).__name__}, expected a function")
    defaults = getattr(obj, "LOWMEM", None) or {}
    if not isinstance(defaults, dict):
        raise TaskError(f"{source}: LOWMEM must be a dict like {{'steps': 500, 'lr': 3e-4, 'every': 10}}, "
                        f"found {type(defaults).__name__}")
    for k, v in defaults.items():
        if k not in DEFAULT_KEYS:
            raise TaskError(f"{source}: LOWMEM has unknown key {k!r}; known: {', '.join(DEFAULT_KEYS)}.{_did_you_mean(str(k), DEFAULT_KEYS)}")
        typ = DEFAULT_KEYS[k]
        accept, expected = _DEFAULT_RULES[k]
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or (typ is int and not float(v).is_integer())
                or not accept(float(v))):
            raise TaskError(f"{source}: LOWMEM[{k!r}] must be {expected} (as --{k}), found {v!r}")
    return Task(obj.build_model, obj.get_batch, obj.loss_fn, build_optimizer,
                {k: DEFAULT_KEYS[k](v) for k, v in defaults.items()}, source, _val_batches(obj, source))


def _val_batches(obj, source: str):
    """Held-out batches: ``get_val_batch(i)`` when defined, else ``get_batch(i, split="val")``
    when `get_batch` takes a ``split`` argument (as the built-in examples do), else None."""
    fn = getattr(obj, "get_val_batch", None)
    if fn is not None:
        if not callable(fn):
            raise TaskError(f"{source}: get_val_batch is a {type(fn).__name__}, expected a function")
        return fn
    try:
        params = inspect.signature(obj.get_batch).parameters
    except (TypeError, ValueError):
        return None
    if "split" in params:
        get_batch = obj.get_batch
        return lambda i: get_batch(i, split="val")
    return None
