"""`lowmem-analyze hessian`: the table, the JSON document and the files against independent
numbers (numpy eigenvalues and masses of the saved arrays, torch's dense Hessian, a model trained
by hand), the plan, and every failure's exit code and message."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowmem.cli.contract import load_task
from lowmem.cli.hessian import default_blocks, file_stem, heads_of, rows_first
from lowmem.cli.main import main
from lowmem.compress import Plan
from lowmem.examples import binary
from lowmem.hessian import block_hessian, piece
from lowmem.layers import resolve_layers
from tiny_models import SOURCE

# One attention layer (separate q, k, v, o; width 8, 2 heads) and an MLP (8 -> 16 -> 8).
MODEL = SOURCE + '''\
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.c_proj = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def build_model():
    return Net()


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, T, WIDTH, generator=g)
    return x, torch.roll(x, 1, dims=1)


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)
'''
DEFAULT = ["attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]


def hessian(*args) -> tuple[int, str, str]:
    """Run ``lowmem-analyze hessian ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["hessian", *map(str, args)])
        except SystemExit as e:                 # argparse refuses the flags
            code = e.code
    return code, out.getvalue(), err.getvalue()


def write_model(folder: Path, source: str = MODEL) -> Path:
    path = folder / "model.py"
    path.write_text(source)
    return path


def diagonal_mass(H: np.ndarray, blocks: int) -> float:
    """Share of ‖H‖²_F inside `blocks` equal consecutive diagonal blocks (heads, or rows), by numpy."""
    n = H.shape[0] // blocks
    return sum(np.sum(H[i * n:(i + 1) * n, i * n:(i + 1) * n] ** 2) for i in range(blocks)) / np.sum(H ** 2)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Every default block of the tiny model, as a table, with a plan: (folder, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("hessian")
    model = write_model(folder)
    code, out, err = hessian(model, "--out", folder / "out", "--plan-out", folder / "plan.json")
    assert code == 0, err
    return folder, out, err


def test_table_has_a_row_per_default_block_with_its_class(default_run):
    folder, out, err = default_run
    assert err == ""
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in DEFAULT}
    assert list(rows) == DEFAULT
    assert "block-diag (heads)" in rows["attn.q.weight"] and "block-diag (heads)" in rows["attn.k.weight"]
    assert "dense" in rows["attn.v.weight"]
    # c_fc (16 x 8): its class follows its per-row mass, recomputed here: excess over 1/16
    H = np.load(folder / "out" / "mlp.c_fc.weight.npy")
    inside = sum(float((H[8 * r:8 * r + 8, 8 * r:8 * r + 8] ** 2).sum()) for r in range(16)) / float((H ** 2).sum())
    excess = (inside - 1 / 16) / (1 - 1 / 16)
    assert ("block-diagonal by rows" if excess >= 0.75 else "dense") in rows["mlp.c_fc.weight"]
    # per-head mass vs the dense baseline 1/2, recomputed from the saved array
    H = np.load(folder / "out" / "attn.q.weight.npy")
    assert f"{diagonal_mass(H, 2):.3f} (0.500)" in rows["attn.q.weight"]
    assert rows["attn.o.weight"].split("│")[3].strip() == "—"          # heads of o lie along its input


def test_json_numbers_match_numpy_on_the_saved_arrays(default_run):
    folder, _, _ = default_run
    doc = json.loads((folder / "out" / "hessian.json").read_text())
    assert doc["schema"] == "lowmem.hessian/1" and doc["status"] == "complete"
    assert doc["settings"]["at"] == "init" and doc["settings"]["dtype"] == "float64"
    assert [b["block"] for b in doc["blocks"]] == DEFAULT
    for b in doc["blocks"]:
        H = np.load(b["files"]["npy"])
        assert H.dtype == np.float64 and H.shape == (b["size"], b["size"])
        eig = np.linalg.eigvalsh(H)
        assert math.isclose(b["spectrum"]["lambda_max"], eig[-1], rel_tol=1e-10)
        assert math.isclose(b["spectrum"]["lambda_min"], eig[0], rel_tol=1e-10)
        np.testing.assert_allclose(np.load(b["files"]["eigvals"]), eig, rtol=0, atol=1e-10 * np.abs(eig).max())
        assert b["out_axis"] == 0                                  # nn.Linear: rows are output units
        rows = b["shape"][0]
        assert math.isclose(b["mass"]["per row"]["inside"], diagonal_mass(H, rows), rel_tol=1e-10)
        assert b["mass"]["per row"]["baseline"] == 1 / rows
        assert Path(b["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = doc["blocks"][0]
    assert q["heads"] == 2 and q["found"]["groups"] == 2 and q["found"]["rows"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert math.isclose(q["mass"]["per head"]["inside"], diagonal_mass(np.load(q["files"]["npy"]), 2), rel_tol=1e-10)


def test_saved_block_is_torchs_dense_hessian(default_run):
    folder, _, _ = default_run
    task = load_task(str(folder / "model.py"))
    torch.manual_seed(0)                         # the CLI's --seed default
    model = task.build_model().double().eval()
    x, y = task.get_batch(0)
    w = model.attn.q.weight

    def loss(flat):
        return task.loss_fn(lambda inp: torch.func.functional_call(model, {"attn.q.weight": flat.view(8, 8)}, (inp,)),
                            (x.double(), y.double()))

    with sdpa_kernel(SDPBackend.MATH):           # the fused CPU kernel has no double backward
        reference = torch.autograd.functional.hessian(loss, w.detach().reshape(-1).clone())
    np.testing.assert_allclose(np.load(folder / "out" / "attn.q.weight.npy"), reference.numpy(), rtol=0, atol=1e-12)


def test_plan_out_gives_q_and_k_one_value_per_head(default_run):
    folder, _, _ = default_run
    plan = Plan.load(folder / "plan.json")
    assert plan.source["method"] == "hessian"
    assert (plan.layers["attn.q.weight"].view, plan.layers["attn.q.weight"].reduce) == ([2, 4, 8], [1, 2])
    assert plan.layers["attn.v.weight"].reduce == [0, 1]               # dense: one value
    assert plan.layers["mlp.c_fc.bias"].reduce is None                  # not measured: full Adam
    doc = json.loads((folder / "out" / "hessian.json").read_text())
    assert doc["plan"]["path"] == str(folder / "plan.json") and doc["plan"]["uncovered"] == []


def test_json_format_prints_hessian_json_and_nothing_else(tmp_path):
    model = write_model(tmp_path)
    code, out, err = hessian(model, "--block", "attn.k.weight[0:4]", "--out", tmp_path / "o", "--format", "json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / "o" / "hessian.json").read_text())
    (block,) = doc["blocks"]
    assert (block["size"], block["shape"], block["heads"]) == (32, [4, 8], None)   # rows 0-3: one head
    assert Path(block["files"]["npy"]).name == "attn.k.weight_0-4.npy"


def test_at_n_steps_is_the_hessian_of_the_model_adamw_trained(tmp_path):
    model_py = write_model(tmp_path)
    code, out, err = hessian(model_py, "--block", "attn.v.weight", "--at", 3, "--lr", 0.05, "--out", tmp_path / "o",
                             "--format", "json")
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert (settings["at"], settings["optimizer"]) == (3, "AdamW(lr=0.05)")
    task = load_task(str(model_py))
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(3):
        task.loss_fn(model, task.get_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    expected = block_hessian(model, task.loss_fn, [task.get_batch(0)], "attn.v.weight", dtype=torch.float64)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "attn.v.weight.npy"), expected.numpy(), rtol=0, atol=1e-12)
    init = block_hessian(load_task(str(model_py)).build_model(), task.loss_fn, [task.get_batch(0)], "attn.v.weight",
                         dtype=torch.float64)
    assert not np.allclose(expected.numpy(), init.numpy())


def test_a_too_large_block_is_reported_and_the_others_complete(tmp_path):
    model = write_model(tmp_path)
    limit = 64 * 64 * 8 / 2**30                  # a 64-entry block fits in float64, a 128-entry one does not
    code, out, err = hessian(model, "--block", "mlp.c_fc.weight", "--block", "attn.q.weight", "--max-gib", limit,
                             "--out", tmp_path / "o")
    assert code == 0
    fc = next(line for line in out.splitlines() if line.startswith("mlp.c_fc.weight"))
    assert "too large" in fc
    # 128 x 128 float64 = 131,072 bytes against 64 x 64 x 8 = 32,768: both in KiB, not "0.00 GiB"
    assert "mlp.c_fc.weight: the block" in " ".join(out.split())
    assert "128.00 KiB in float64, over the 32.00 KiB allowed" in " ".join(out.split())
    assert "too large" in err
    doc = json.loads((tmp_path / "o" / "hessian.json").read_text())
    assert doc["status"] == "partial"
    assert [b["status"] for b in doc["blocks"]] == ["too_large", "done"]
    assert (tmp_path / "o" / "attn.q.weight.npy").exists() and not (tmp_path / "o" / "mlp.c_fc.weight.npy").exists()


def refused(code: int, out: str, err: str, expected: int) -> str:
    assert code == expected, err
    assert out == ""
    assert "lowmem-analyze hessian: error: " in err and "Traceback" not in err
    return err


def test_bad_selectors_exit_2_before_anything_is_computed(tmp_path):
    model = write_model(tmp_path)
    err = refused(*hessian(model, "--block", "attn.nope.weight", "--out", tmp_path / "o"), 2)
    assert "--block 'attn.nope.weight': no trainable parameter 'attn.nope.weight'" in err
    err = refused(*hessian(model, "--block", "attn.q.weight[part=q]", "--out", tmp_path / "o"), 2)
    assert "not a fused Q/K/V projection" in err
    err = refused(*hessian(model, "--block", "attn.q.weight[0:99]", "--out", tmp_path / "o"), 2)
    assert "out of range" in err
    assert not (tmp_path / "o").exists()
    refused(*hessian(model, "--at", "soon"), 2)
    refused(*hessian(), 2)


# A model with a parameter its forward pass never uses and a frozen one.
EXTRAS = MODEL.replace("        self.mlp = MLP()\n", "        self.mlp = MLP()\n        self.unused = nn.Linear(2, 2)\n"
                       "        self.frozen = nn.Linear(2, 2).requires_grad_(False)\n")


@pytest.mark.parametrize("selector, words", [
    ("attn.q.weight[part=z]", "--block 'attn.q.weight[part=z]': attn.q.weight is not a fused Q/K/V projection"),
    ("attn.q.weight[5:2]", "--block 'attn.q.weight[5:2]': slice '5:2' is empty"),
    ("attn.q.weight[0:1e9]", "--block 'attn.q.weight[0:1e9]': cannot read slice '0:1e9'"),
    ("attn.q.weight[head=0, head=1]", "head= is given twice"),
    ("attn.q.weight[head=2]", "head 2 out of range (0..1)"),
    ("attn.q.weight[0:1, 0:1, 0:1]", "3 slices, but attn.q.weight has 2 dim(s)"),
    ("attn.q", "--block 'attn.q': attn.q is a module, not a parameter; its parameters: attn.q.weight"),
    ("atn.q.weight", "did you mean attn.q.weight"),
    ("frozen.weight", "--block 'frozen.weight': frozen.weight is frozen (requires_grad=False)"),
    ("", "--block '': cannot read the block selector"),
])
def test_every_bad_selector_exits_2_naming_itself_once(tmp_path, selector, words):
    model = write_model(tmp_path, EXTRAS)
    err = refused(*hessian(model, "--block", selector, "--out", tmp_path / "o"), 2)
    assert words in err and f"{selector!r}: {selector!r}" not in err      # not "--block 'x': 'x': …"
    assert not (tmp_path / "o").exists()


def test_slices_after_part_and_head_apply_inside_them_whatever_the_order(tmp_path):
    model = write_model(tmp_path)
    code, out, err = hessian(model, "--block", "attn.q.weight[0:2, head=1]", "--out", tmp_path / "o", "--format", "json")
    assert code == 0, err
    (b,) = json.loads(out)["blocks"]
    assert b["shape"] == [2, 8]                                  # rows 4, 5: the first 2 of head 1 (rows 4..7)
    H = np.load(b["files"]["npy"])
    whole = np.load(json.loads(hessian(model, "--block", "attn.q.weight", "--out", tmp_path / "w", "--format",
                                       "json")[1])["blocks"][0]["files"]["npy"])
    np.testing.assert_array_equal(H, whole[32:48, 32:48])


def lowmem_analyze(folder: Path, *args) -> subprocess.CompletedProcess:
    """The real command in a fresh process, in `folder`."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", "hessian", *map(str, args)], cwd=folder,
                          capture_output=True, text=True, timeout=300, env=env)


def exits(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.parametrize("new, words", [
    ("return F.mse_loss(model(x), y).detach()", "model.py: loss_fn returned a loss with no gradient"),
    ("with torch.no_grad():\n        return F.mse_loss(model(x), y)", "returned a loss with no gradient"),
    ("return F.mse_loss(model(x), y) * (1 + 1j)", "must return a scalar torch.Tensor of a real floating-point dtype, "
                                                "it returned a tensor of dtype complex64 on batch 0"),
    ("return torch.tensor(3)", "it returned a tensor of dtype int64 on batch 0"),
    ("return ((model(x) - y) ** 2).mean((0, 1))", "it returned a tensor of shape (8,) on batch 0"),
    ("return 3", "it returned int on batch 0"),
    # fine in float32, not on the float64 copy: a tensor made in loss_fn without the batch's dtype
    ("return F.mse_loss(model(x), y) + (x @ torch.ones(WIDTH, 1)).mean() * 0",
     "loss_fn(model, batch) in model.py raised RuntimeError: expected m1 and m2 to have the same dtype"),
    ("if torch.is_grad_enabled():\n        raise KeyError('only with grad')\n    return F.mse_loss(model(x), y)",
     "loss_fn(model, batch) in model.py raised KeyError: 'only with grad' while computing the Hessian"),
])
def test_a_loss_fn_the_hessian_cannot_use_exits_3_with_what_it_returned(tmp_path, new, words):
    write_model(tmp_path, MODEL.replace("return F.mse_loss(model(x), y)", new))
    err = exits(lowmem_analyze(tmp_path, "model.py", "--block", "attn.q.weight[0:1]", "--block", "attn.k.weight[0:1]"),
                3)
    assert "lowmem-analyze hessian: error: " in err and words in " ".join(err.split())
    if "same dtype" in words:
        assert "on a float64 copy of the model" in err and "--dtype float32" in err


def test_a_loss_fn_without_gradient_exits_3_before_training_at_n(tmp_path):
    write_model(tmp_path, MODEL.replace("return F.mse_loss(model(x), y)", "return F.mse_loss(model(x), y).detach()"))
    err = exits(lowmem_analyze(tmp_path, "model.py", "--block", "attn.q.weight[0:1]", "--at", 2), 3)
    assert "returned a loss with no gradient at step 0" in err and "element 0 of tensors" not in err


def test_blocks_linear_in_the_loss_are_exact_zeros_not_failures(tmp_path):
    # model(x).mean(): the MLP's output projection enters linearly (its Hessian blocks are 0),
    # the attention's query does not
    write_model(tmp_path, MODEL.replace("return F.mse_loss(model(x), y)", "return model(x).mean()"))
    r = lowmem_analyze(tmp_path, "model.py", "--block", "mlp.c_proj.bias", "--block", "mlp.c_proj.weight[0:1]",
                       "--block", "attn.q.weight[0:1]", "--out", "o", "--format", "json", "--plan-out", "plan.json")
    exits(r, 0)
    blocks = json.loads(r.stdout)["blocks"]
    assert [b["status"] for b in blocks] == ["done"] * 3
    bias, row, q = (np.load(tmp_path / b["files"]["npy"]) for b in blocks)
    assert bias.shape == (8, 8) and row.shape == (16, 16) and bias.dtype == row.dtype == np.float64
    assert not bias.any() and not row.any() and q.any()
    assert blocks[0]["class"]["label"] == "zero" and blocks[0]["spectrum"]["lambda_max"] == 0
    task = load_task(str(tmp_path / "model.py"))
    torch.manual_seed(0)
    model = task.build_model().double()
    x = task.get_batch(0)[0].double()

    def loss(b):
        return torch.func.functional_call(model, {"mlp.c_proj.bias": b}, (x,)).mean()

    reference = torch.autograd.functional.hessian(loss, model.mlp.c_proj.bias.detach().clone())
    np.testing.assert_array_equal(bias, reference.numpy())


def test_a_parameter_the_loss_does_not_use_fails_its_block_only(tmp_path):
    write_model(tmp_path, EXTRAS)
    r = lowmem_analyze(tmp_path, "model.py", "--block", "unused.weight", "--block", "attn.q.weight[0:1]", "--out", "o",
                       "--format", "json")
    err = exits(r, 0)
    unused, q = json.loads(r.stdout)["blocks"]
    assert (unused["status"], q["status"]) == ("failed", "done")
    assert unused["reason"].startswith("the loss does not depend on unused.weight: there is no gradient path")
    assert "unused.weight: failed: the loss does not depend on unused.weight" in err
    err = exits(lowmem_analyze(tmp_path, "model.py", "--block", "unused.weight", "--out", "o"), 3)
    assert "no block could be computed: unused.weight: the loss does not depend on unused.weight" in err


def test_every_block_too_large_exits_2(tmp_path):
    model = write_model(tmp_path)
    err = refused(*hessian(model, "--block", "attn.q.weight", "--max-gib", 1e-9, "--out", tmp_path / "o"), 2)
    assert "every block is too large" in err and "[head=0] takes one head" in err
    # 1e-9 GiB is 1.07 bytes: the limit reads as 1 B, the block as 64 x 64 x 8 = 32 KiB
    assert "32.00 KiB in float64, over the 1 B allowed" in err and "even one row of attn.q.weight" in err


def test_a_tiny_max_gib_prints_sizes_that_mean_something(tmp_path):
    model = write_model(tmp_path)
    err = refused(*hessian(model, "--block", "attn.q.weight", "--max-gib", "0.0000001", "--out", tmp_path / "o"), 2)
    # 1e-7 GiB = 107.37 bytes, the limit in whole bytes; the block is 64 x 64 x 8 = 32 KiB
    assert "32.00 KiB in float64, over the 107 B allowed" in err and "0.00 GiB" not in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "1e400", "lots"])
def test_max_gib_that_is_not_positive_and_finite_is_refused_at_parse_time(tmp_path, value):
    model = write_model(tmp_path)
    code, out, err = hessian(model, f"--max-gib={value}", "--out", tmp_path / "o")     # = : '-inf' is no option
    assert (code, out) == (2, "")
    assert f"argument --max-gib: expected a positive finite number, got '{value}'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("old, new, words", [
    ("return F.mse_loss(model(x), y)", "raise KeyError('y')", "loss_fn(model, batch) in"),
    ("return F.mse_loss(model(x), y)", "return F.mse_loss(F.dropout(model(x), 0.5, training=True), y)",
     "random even in eval() mode"),
    ("return F.mse_loss(model(x), y)", "return F.mse_loss(model(x), y) * float('nan')", "nan"),
])
def test_user_code_failures_exit_3(tmp_path, old, new, words):
    model = write_model(tmp_path, MODEL.replace(old, new))
    err = refused(*hessian(model, "--block", "attn.q.weight[0:1]", "--out", tmp_path / "o"), 3)
    assert words in err


def test_default_blocks_split_fused_qkv_into_parts_and_skip_large_ones():
    layers = resolve_layers(binary.build_model(), warn=False)
    chosen, skipped = default_blocks(layers, 1024)
    h0 = "transformer.h.0."
    assert chosen[:4] == [f"{h0}attn.c_attn.weight[part=q]", f"{h0}attn.c_attn.weight[part=k]",
                          f"{h0}attn.c_attn.weight[part=v]", f"{h0}attn.c_proj.weight"]
    assert len(chosen) == 4 * 4
    assert skipped[:2] == [f"{h0}mlp.c_fc.weight: 4,096 entries > --max-entries 1,024",
                           f"{h0}mlp.c_proj.weight: 4,096 entries > --max-entries 1,024"]
    assert len(default_blocks(layers, 4096)[0]) == 4 * 6


class Conv1D(nn.Module):
    """HF GPT-2's transposed linear: weight (in, out)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))


def test_transposed_fused_weight_is_read_with_its_output_units_as_rows():
    attn = nn.Module()
    attn.n_head = 2
    attn.c_attn = Conv1D(8, 24)
    model = nn.ModuleDict({"attn": attn})
    layers = resolve_layers(model, warn=False)
    info = layers["attn.c_attn.weight"]
    p = piece(model, "attn.c_attn.weight[part=k]", layers)
    perm, shape = rows_first(p, info)
    assert shape == (8, 8) and heads_of(p, info) == 2
    assert torch.equal(perm, torch.arange(64).view(8, 8).T.reshape(-1))    # (in, out) flat -> (out, in) flat
    assert heads_of(piece(model, "attn.c_attn.weight[part=k, head=1]", layers), info) is None


def test_file_stems_are_safe_and_unique():
    taken: set[str] = set()
    assert file_stem("h.0.c_attn.weight[part=q, head=1]", taken) == "h.0.c_attn.weight_part=q_head=1"
    assert file_stem("h.0.c_attn.weight[part=q,  head=1]", taken) == "h.0.c_attn.weight_part=q_head=1-2"
    assert file_stem("w[0:8, 2:4]", taken) == "w_0-8_2-4"


def test_one_head_of_the_binary_example(tmp_path):
    block = "transformer.h.0.attn.c_attn.weight[part=q, head=0]"
    code, out, err = hessian("--example", "binary", "--block", block, "--out", tmp_path, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["settings"]["batch_source"] == "the whole dataset()"
    (b,) = doc["blocks"]
    assert (b["size"], b["shape"], b["heads"]) == (256, [8, 32], None)
    H = np.load(b["files"]["npy"])
    assert np.allclose(H, H.T, rtol=0, atol=1e-12 * np.abs(H).max())
    assert math.isclose(b["spectrum"]["lambda_max"], np.linalg.eigvalsh(H)[-1], rel_tol=1e-10)
