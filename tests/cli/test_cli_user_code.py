"""The real `lowmem-analyze` command in a subprocess, fed user code that breaks the model.py
contract in ways a person really writes: it exits, parses the command line at import, gives
LOWMEM values the flags refuse, builds on the meta device, returns a loss the model did not
make. Each gets exit code 3 (2 for the command line) and a message naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lowmem.cli.common import seed_int
from tiny_models import MLP_MODEL_PY

TINY = MLP_MODEL_PY


def run(tmp_path, *args, source=None, name="model.py", device="cpu", timeout=120):
    """The command in `tmp_path` (writing `source` to `name` first), on `device` unless None."""
    if source is not None:
        (tmp_path / name).write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    tail = ["--device", device] if device else []
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args), *tail],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def redefined(body: str) -> str:
    """TINY followed by `body`, whose definitions replace TINY's (the later one wins at import)."""
    return TINY + f"\nimport sys\n\n{body}\n"


def assert_user_error(r, *expected):
    assert r.returncode == 3, r.stderr
    for text in expected:
        assert text in r.stderr, (text, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


# -- user code that exits ------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    (redefined("def build_model():\n    sys.exit(0)"),
     "build_model() in model.py called sys.exit(0)"),
    (redefined("def get_batch(step):\n    sys.exit(1)"),
     "get_batch(0) in model.py called sys.exit(1)"),
    (redefined("def loss_fn(model, batch):\n    sys.exit('done')"),
     "loss_fn(model, batch) in model.py called sys.exit('done')"),
    (redefined("def build_optimizer(model):\n    sys.exit(0)"),
     "build_optimizer(model) in model.py called sys.exit(0)"),
])
def test_user_function_that_calls_sys_exit_is_a_failure_of_user_code(tmp_path, source, expected):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=source)
    assert_user_error(r, expected, "it must return, not exit", 'model.py", line')
    assert r.stdout == ""


def test_factory_that_calls_sys_exit(tmp_path):
    src = TINY + "\nimport sys\n\ndef factory():\n    sys.exit(0)\n"
    r = run(tmp_path, "model.py:factory", "--steps", "2", "--every", "1", source=src)
    assert_user_error(r, "factory() in model.py called sys.exit(0)")


def test_compare_reports_user_code_that_exits(tmp_path):
    for body, expected in (("def build_model():\n    sys.exit(0)", "build_model() in model.py called sys.exit(0)"),
                           ("def get_batch(step):\n    sys.exit(5)", "get_batch(0) in model.py called sys.exit(5)")):
        r = run(tmp_path, "compare", "model.py", "--optimizers", "adamw", "--lrs", "1e-3", "--steps", "2", "--out", "c",
                source=redefined(body))
        assert_user_error(r, expected)


def test_ctrl_c_raised_in_user_code_still_means_interrupted(tmp_path):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1",
            source=redefined("def build_model():\n    raise KeyboardInterrupt"))
    assert r.returncode == 130 and "interrupted" in r.stderr, r.stderr


# -- model.py that runs a script at import ------------------------------------------------------

def test_exit_at_import_names_the_line_and_where_the_script_belongs(tmp_path):
    src = TINY + "\nimport sys\nsys.exit(0)\n"
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=src)
    line = textwrap.dedent(src).splitlines().index("sys.exit(0)") + 1
    assert_user_error(r, "model.py exited while being imported (sys.exit(0))", f'model.py", line {line}',
                      'if __name__ == "__main__":')


def test_argparse_at_import_sees_no_lowmem_flags_and_its_exit_is_explained(tmp_path):
    src = TINY + ("\nimport argparse\nparser = argparse.ArgumentParser()\n"
                  "parser.add_argument('--data', required=True)\nARGS = parser.parse_args()\n")
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=src)
    assert_user_error(r, "model.py exited while being imported (sys.exit(2))", "argument parsing (argparse)",
                      'if __name__ == "__main__":')
    # argparse's own usage line names model.py, so it does not read as lowmem's.
    assert "usage: model.py [-h] --data DATA" in r.stderr and "--steps" not in r.stderr.split("lowmem-analyze:")[0]


def test_sys_argv_is_the_model_file_during_import_and_restored_after(tmp_path):
    src = TINY + ("\nimport sys\nprint('at import:', sys.argv)\n_build = build_model\n"
                  "def build_model():\n    print('in build_model:', sys.argv[1:4])\n    return _build()\n")
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", "--out", "o", "-q", source=src)
    assert r.returncode == 0, r.stderr
    assert "at import: ['model.py']" in r.stderr
    assert "in build_model: ['model.py', '--steps', '2']" in r.stderr


# -- LOWMEM checked by the rules of the flags ---------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ('{"lr": -1e-3}', "LOWMEM['lr'] must be a positive finite number (as --lr), found -0.001"),
    ('{"lr": float("nan")}', "LOWMEM['lr'] must be a positive finite number (as --lr), found nan"),
    ('{"every": 0}', "LOWMEM['every'] must be a positive integer (as --every), found 0"),
    ('{"steps": -5}', "LOWMEM['steps'] must be a positive integer (as --steps), found -5"),
])
def test_lowmem_defaults_follow_the_rules_of_the_flags(tmp_path, value, expected):
    r = run(tmp_path, "model.py", source=TINY + f"\nLOWMEM = {value}\n")
    assert_user_error(r, f"model.py: {expected}")


# -- models and losses that cannot be trained ---------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ("def build_model():\n    with torch.device('meta'):\n        return nn.Linear(4, 2)",
     "returned a Linear with 2 of 2 parameters and buffers on the meta device (e.g. weight)"),
    ("def build_model():\n    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))\n"
     "    m[2].weight = nn.Parameter(torch.empty(2, 8, device='meta'))\n    return m",
     "returned a Sequential with 1 of 4 parameters and buffers on the meta device (e.g. 2.weight)"),
])
def test_model_on_the_meta_device_must_be_materialised(tmp_path, body, expected):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=redefined(body))
    assert_user_error(r, f"build_model() in model.py {expected}", "to_empty")


@pytest.mark.parametrize("body, expected", [
    ("def loss_fn(model, batch):\n    return torch.tensor(1.0, requires_grad=True)",
     "returned a leaf tensor at step 0"),
    ("def loss_fn(model, batch):\n    x, y = batch\n    w = torch.ones(4, requires_grad=True)\n    return (x * w).mean()",
     "returned a loss that does not depend on the model's parameters: after loss.backward() at step 0 none of "
     "the 4 trainable parameters"),
    ("OTHER = build_model()\n\ndef loss_fn(model, batch):\n    x, y = batch\n    return ((OTHER(x) - y) ** 2).mean()",
     "returned a loss that does not depend on the model's parameters"),
])
def test_loss_not_made_by_the_model_is_named_not_blamed_on_every(tmp_path, body, expected):
    r = run(tmp_path, "model.py", "--steps", "20", "--every", "2", source=redefined(body))
    assert_user_error(r, f"loss_fn(model, batch) in model.py {expected}")
    assert "--every" not in r.stderr and "loss from model(...)" in r.stderr


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("device, expected", [
    ("mps", "--device mps requested but torch has no mps device on this machine; use one of: cpu"),
    ("xla", "--device xla requested but torch has no xla device on this machine; use one of: cpu"),
    ("meta", "--device meta holds shapes without values"),
    ("cuda:99", "--device cuda:99 requested but torch sees"),
])
def test_device_this_machine_lacks_is_a_usage_error_naming_what_it_has(tmp_path, device, expected):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=TINY, device=device)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_seed_type_takes_torch_manual_seeds_unsigned_range():
    import argparse
    assert seed_int("0") == 0 and seed_int(str(2 ** 64 - 1)) == 2 ** 64 - 1
    for text in ("-1", str(2 ** 64), str(2 ** 70), "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
            seed_int(text)


# -- small messages -----------------------------------------------------------------------------

def test_file_with_null_bytes_is_called_binary(tmp_path):
    (tmp_path / "model.py").write_bytes(b"import torch\n\x00\x00\x7fELF\n")
    r = run(tmp_path, "model.py")
    assert_user_error(r, "model.py: the file contains null bytes (is it a binary file?)")
    assert "line None" not in r.stderr


def test_broken_symlink_names_its_target_and_suggests_nothing(tmp_path):
    (tmp_path / "model.py").symlink_to(tmp_path / "gone.py")
    r = run(tmp_path, "model.py")
    assert r.returncode == 2, r.stderr
    assert f"model.py: is a broken symlink pointing to {tmp_path / 'gone.py'}" in r.stderr
    assert "Did you mean" not in r.stderr


@pytest.mark.parametrize("args", [("reprot",), ("reprot", "lowmem-out"), ("comapre", "model.py", "--steps", "3")])
def test_command_typo_suggests_the_command(tmp_path, args):
    r = run(tmp_path, *args, device=None)
    assert r.returncode == 2, r.stderr
    assert f"'{args[0]}' is neither a file nor a command. Did you mean the command" in r.stderr
    assert "unrecognized arguments" not in r.stderr


@pytest.mark.parametrize("command", [(), ("compare",), ("hessian",)])
def test_seed_out_of_torch_range_is_a_usage_error_in_every_command(tmp_path, command):
    r = run(tmp_path, *command, "model.py", "--seed", str(2 ** 70), source=TINY)
    assert r.returncode == 2, r.stderr
    assert "--seed: expected an integer from 0 to 2**64 - 1" in r.stderr and "Traceback" not in r.stderr


def test_every_beyond_steps_is_refused_before_training(tmp_path):
    r = run(tmp_path, "model.py", "--steps", "3", "--every", "5", "--out", "o", source=TINY)
    assert r.returncode == 2, r.stderr
    assert "measuring every 5 steps (--every or LOWMEM['every']) needs at least that many steps; the probe runs 3" \
        in r.stderr
    assert not (tmp_path / "o").exists()


def test_compare_names_a_loss_not_made_by_the_model(tmp_path):
    body = "def loss_fn(model, batch):\n    x, y = batch\n    w = torch.ones(4, requires_grad=True)\n    return (x * w).mean()"
    r = run(tmp_path, "compare", "model.py", "--steps", "3", "--optimizers", "adamw", "--lrs", "1e-3", "--out", "c",
            source=redefined(body))
    assert_user_error(r, "returned a loss that does not depend on the model's parameters")


# -- more of what people write ------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ("def get_batch(step):\n    x = torch.randn(16, 4)\n    (x, x[:, :2])",
     "get_batch(0) in model.py returned None: it must return the batch for step 0"),
    ("def get_batch(step):\n    x = torch.randn(16, 4)\n    yield x, x[:, :2]",
     "get_batch(0) in model.py returned a generator (get_batch uses `yield`)"),
    ("def get_batch(step):\n    x = torch.randn(16, 4)\n    return iter([(x, x[:, :2])])",
     "get_batch(0) in model.py returned an iterator (list_iterator)"),
    ("def loss_fn(model, batch):\n    return torch.tensor(3)",
     "must return a floating-point loss, it returned a tensor of dtype torch.int64 at step 0"),
    ("def loss_fn(model, batch):\n    x, y = batch\n    out = model(x)\n    return ((out - y) ** 2).mean(), out",
     "it returned tuple at step 0; return the loss alone"),
    ("def build_optimizer(model):\n    return torch.optim.AdamW(nn.Linear(3, 3).parameters())",
     "build_optimizer(model) in model.py returned an optimizer (AdamW) over none of the model's parameters"),
    ("def build_optimizer(model):\n    return torch.optim.LBFGS(model.parameters())",
     "optimizer.step() of the LBFGS from build_optimizer(model) in model.py raised TypeError"),
    ("def get_batch():\n    x = torch.randn(16, 4)\n    return x, x[:, :2]",
     "get_batch(0) in model.py cannot be called that way (get_batch() takes 0 positional arguments but 1 was "
     "given): the model.py contract calls it as get_batch(0)"),
    ("class Net(nn.Linear):\n    def __init__(self):\n        super().__init__(4, 2)\n\n"
     "def build_model():\n    return Net",
     "build_model() in model.py must return a torch.nn.Module, it returned type (the class Net itself"),
    ("_loss_fn = loss_fn\n\ndef loss_fn(model, batch):\n    loss = _loss_fn(model, batch)\n    loss.backward()\n"
     "    return loss",
     "does loss_fn call backward() itself?"),
])
def test_more_broken_returns(tmp_path, body, expected):
    r = run(tmp_path, "model.py", "--steps", "4", "--every", "2", source=redefined(body))
    assert_user_error(r, expected)


@pytest.mark.parametrize("returned, expected", [
    ("None", "model.py:factory() returned None: a factory must return an object with build_model"),
    ("{'build_model': build_model}", "model.py:factory() returned a dict: a factory must return an object with "
                                     "build_model, get_batch and loss_fn as attributes"),
    ("build_model()", "model.py:factory() returned a Sequential"),
])
def test_factory_returning_no_task(tmp_path, returned, expected):
    r = run(tmp_path, "model.py:factory", "--steps", "2", "--every", "1", source=TINY + f"\ndef factory():\n    return {returned}\n")
    assert_user_error(r, expected)


def test_model_file_that_is_not_python_or_a_folder_is_a_usage_error(tmp_path):
    (tmp_path / "model.txt").write_text(textwrap.dedent(TINY))
    (tmp_path / "folder.py").mkdir()
    for target, expected in (("model.txt", "model.txt: cannot be imported as a Python file (expected a .py file)"),
                             ("folder.py", "folder.py: is a folder")):
        r = run(tmp_path, target)
        assert r.returncode == 2 and expected in r.stderr, r.stderr
