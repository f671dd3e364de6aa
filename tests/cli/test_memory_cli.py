"""`lowmem-analyze memory`: the table and the JSON document for configs, model.py files and
examples, a plan row, and every bad input's exit code and message (stdout stays empty)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lowmem.cli.main import main
from lowmem.compress import slimadam_rules
from lowmem.compress.configs import build_config_model
from lowmem.compress.memory import ALL_FORMATS, estimate_state_memory
from lowmem.compress.optim.registry import NAMES

LLAMA2_7B = 6_738_415_616
ROWS = list(NAMES)   # the registry, AdamW first
PRESET_ROWS = ["slimadam", "eve", "adam-mini", "adam-mini-paper", "adalayer"]

MODEL = '''\
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

def get_batch(step):
    x = torch.randn(8, 4)
    return x, x[:, :2]

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
'''
MODEL_PARAMETERS = 4 * 8 + 8 + 8 * 2 + 2      # 58


def memory(capsys, *args) -> tuple[int, str, str]:
    """Run ``lowmem-analyze memory ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(["memory", *map(str, args)])
    except SystemExit as e:                     # argparse refuses the flags
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args) -> str:
    code, out, err = memory(capsys, *args)
    assert code == 2, err
    assert out == ""
    assert "lowmem-analyze memory: error: " in err and "Traceback" not in err
    return err


def test_text_names_the_model_and_lists_adamw_every_preset_and_adamem(capsys):
    code, out, err = memory(capsys, "--config", "llama2-7b")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"Optimizer state of llama2-7b (LlamaForCausalLM, {LLAMA2_7B:,} fp32 parameters)"
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ROWS}
    assert list(rows) == ROWS
    adamw_gib = f"{2 * 4 * LLAMA2_7B / 2**30:,.2f} GiB"        # 50.21 GiB
    assert adamw_gib in rows["adamw"] and "0.00%" in rows["adamw"]


def test_json_is_one_document_with_the_library_estimate_in_raw_bytes(capsys):
    code, out, err = memory(capsys, "--config", "llama2-7b", "--format", "json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["model"] == {"name": "llama2-7b", "class": "LlamaForCausalLM", "parameters": LLAMA2_7B}
    assert (doc["config"], doc["plan"], doc["bytes_per_state"]) == ("llama2-7b", None, 4)
    assert doc["optimizers"] == estimate_state_memory(build_config_model("llama2-7b")).to_json()["optimizers"]
    adamw = doc["optimizers"][0]
    assert adamw["name"] == "adamw" and adamw["total_bytes"] == 2 * 4 * LLAMA2_7B == 53_907_324_928
    assert adamw["bytes_per_param"] == 8.0 and doc["param_dtype"] == "fp32"


def test_bytes_per_state_scales_every_row(capsys):
    docs = [json.loads(memory(capsys, "--config", "gpt2-124m", "--format", "json", "--bytes-per-state", b)[1])
            for b in (4, 2)]
    assert docs[1]["bytes_per_state"] == 2
    for four, two in zip(docs[0]["optimizers"], docs[1]["optimizers"]):
        assert 2 * two["total_bytes"] == four["total_bytes"] and two["total_saved"] == four["total_saved"]
    assert "expected a positive integer, got '0'" in refused(capsys, "--config", "gpt2-124m", "--bytes-per-state", "0")


def test_a_plan_written_by_lowmem_adds_a_row(capsys, tmp_path):
    plan = slimadam_rules(build_config_model("gpt2-124m"))
    path = plan.save(tmp_path / "plan.json")
    code, out, err = memory(capsys, "--config", "gpt2-124m", "--plan", path, "--format", "json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    row = doc["optimizers"][-1]
    assert [r["name"] for r in doc["optimizers"]] == [*ROWS, "plan"] and doc["plan"] == str(path)
    assert row["v_bytes"] == 4 * plan.v_kept and row["m_bytes"] == 4 * plan.v_full == 4 * 124_439_808
    code, out, _ = memory(capsys, "--config", "gpt2-124m", "--plan", path)
    assert code == 0 and any(line.startswith("plan ") for line in out.splitlines())
    assert f"plan: {path}" in out.splitlines()
    grid = out.split("Bytes per parameter in each state format")[1].splitlines()
    assert grid[2].split() == ["state", "┃", *" ┃ ".join(PRESET_ROWS + ["plan"]).split()]   # the plan is a column


def test_unknown_config_lists_the_known_ones(capsys):
    err = refused(capsys, "--config", "llama2-7x")
    assert "unknown config 'llama2-7x'; known: gpt2-124m, gpt2-1.5b, tinyllama-1.1b, llama2-7b" in err
    assert "Did you mean 'llama2-7b'?" in err


def test_missing_corrupt_and_mismatched_plans_are_usage_errors(capsys, tmp_path):
    assert "nope.json: no such plan file" in refused(capsys, "--config", "gpt2-124m", "--plan", tmp_path / "nope.json")
    path = slimadam_rules(build_config_model("gpt2-124m")).save(tmp_path / "plan.json")
    err = refused(capsys, "--config", "tinyllama-1.1b", "--plan", path)
    assert f"{path} does not fit tinyllama-1.1b" in err and "GPT2LMHeadModel" in err
    broken = tmp_path / "broken.json"
    broken.write_text(path.read_text()[:100])
    assert "broken.json: line" in refused(capsys, "--config", "gpt2-124m", "--plan", broken)


def test_one_model_source_exactly(capsys, tmp_path):
    assert "nothing to measure" in refused(capsys)
    assert "not model.py and --config" in refused(capsys, "model.py", "--config", "gpt2-124m")
    assert "--meta applies to a model.py" in refused(capsys, "--config", "gpt2-124m", "--meta")
    assert "nope.py: no such file" in refused(capsys, tmp_path / "nope.py")


def test_model_py_built_normally_and_on_meta(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL)
    docs = []
    for extra in ([], ["--meta"]):
        code, out, err = memory(capsys, "model.py", "--format", "json", *extra)
        assert (code, err) == (0, "")
        docs.append(json.loads(out))
    assert docs[0] == docs[1]
    assert docs[0]["model"] == {"name": "model.py", "class": "Sequential", "parameters": MODEL_PARAMETERS}
    assert docs[0]["optimizers"][0]["total_bytes"] == 2 * 4 * MODEL_PARAMETERS


def test_model_py_that_cannot_be_built_on_meta_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL.replace("nn.Linear(8, 2))", "nn.Linear(8, 2)).to('cpu')"))
    assert memory(capsys, "model.py")[0] == 0
    code, out, err = memory(capsys, "model.py", "--meta")
    assert code == 3 and out == ""
    assert "build_model() in model.py raised" in err and "ran on the meta device because of --meta" in err


def test_built_in_example(capsys):
    from lowmem.examples import shakespeare
    n = sum(p.numel() for p in shakespeare.build_model().parameters())
    code, out, err = memory(capsys, "--example", "shakespeare", "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out)["model"] == {"name": "example 'shakespeare'", "class": "GPT", "parameters": n}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_subcommand_runs_from_the_command_line_and_model_py_still_does(tmp_path):
    run = [sys.executable, "-m", "lowmem.cli.main"]
    r = subprocess.run([*run, "memory", "--config", "gpt2-124m", "--format", "json"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert (r.returncode, r.stderr) == (0, "")
    assert json.loads(r.stdout)["model"]["parameters"] == 124_439_808
    r = subprocess.run([*run, "memory", "--config", "nope"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "unknown config 'nope'" in r.stderr
    (tmp_path / "model.py").write_text(MODEL)
    r = subprocess.run([*run, "model.py", "--preset", "eve", "--format", "json", "--device", "cpu"], cwd=tmp_path,
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["plan"]["source"]["preset"] == "eve"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_of_the_main_command_names_the_memory_command(capsys, flag):
    with pytest.raises(SystemExit) as e:
        main([flag])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "lowmem-analyze memory --help" in text
    assert "cuts the probe's measuring time by about 40%, 4x by 60% --depth-average" in text   # (every option's help prints)


# -- state formats and bf16 parameters ----------------------------------------------------------------

def _json(capsys, *args) -> dict:
    code, out, err = memory(capsys, *args, "--format", "json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def _rows(doc: dict) -> dict[tuple[str, str | None], dict]:
    return {(r["name"], None if r["state"] is None else f"m={r['state']['m']},v={r['state']['v']}"): r
            for r in doc["optimizers"]}


def test_state_int8_on_gpt2_124m_by_hand(capsys):
    # Every GPT-2 matrix has rows of 768, 2,304 or 3,072 entries: whole 256-entry blocks, so int8 m
    # is 1 + 4/256 bytes an entry; biases and LayerNorms (1 dim) stay fp32.
    vectors = 12 * (4 * 768 + 2304 + 768 + 3072 + 768) + 2 * 768     # 121,344
    matrices = 124_439_808 - vectors
    doc = _json(capsys, "--config", "gpt2-124m", "--state", "m=int8")
    rows = _rows(doc)
    assert list(rows) == [("adamw", "m=fp32,v=fp32"), *((n, "m=int8,v=fp32") for n in PRESET_ROWS),
                          ("adamem", "m=fp32,v=fp32"), ("adafactor-momentum", "m=fp32,v=fp32")]
    v_kept = slimadam_rules(build_config_model("gpt2-124m")).v_kept
    slim = rows["slimadam", "m=int8,v=fp32"]
    assert slim["m_bytes"] == matrices + 4 * matrices // 256 + 4 * vectors == 126_746_316
    assert slim["v_bytes"] == 4 * v_kept
    assert slim["bytes_per_param"] == round((126_746_316 + 4 * v_kept) / 124_439_808, 6)
    assert slim["total_saved"] == round(1 - (126_746_316 + 4 * v_kept) / (8 * 124_439_808), 6)


def test_state_int8_on_the_shakespeare_example_by_hand(capsys):
    from lowmem.examples import shakespeare
    V, T, C = shakespeare.vocab_size(), 128, 128                   # wte (V, C) tied to the LM head, wpe (T, C)
    # Per 4 blocks: q, k, v, c_proj (C, C), c_fc (4C, C), c_proj (C, 4C), two LayerNorm gains (C,).
    # Rows of 128 entries take one 8-bit code each and one fp32 scale; rows of 512 two scales;
    # the gains (1 dim) stay fp32.
    per_block = 4 * C * (C + 4) + 4 * C * (C + 4) + C * (4 * C + 4 * 2) + 2 * 4 * C
    m_int8 = V * (C + 4) + T * (C + 4) + 4 * per_block + 4 * C
    doc = _json(capsys, "--example", "shakespeare", "--state", "m=int8")
    assert doc["model"]["parameters"] == V * C + T * C + 4 * (12 * C * C + 2 * C) + C
    for name in PRESET_ROWS:
        assert _rows(doc)[name, "m=int8,v=fp32"]["m_bytes"] == m_int8 == 838_976
    eve = _rows(doc)["eve", "m=int8,v=fp32"]
    assert eve["v_bytes"] == 4 * (V + T + 4 * (4 * C + 4 * C + C + 2 * C) + C)   # one v per row; gains whole


def test_several_states_and_all_of_them(capsys):
    doc = _json(capsys, "--config", "gpt2-124m", "--state", "m=int8,m=int4,v=int8", "--state", "bf16")
    assert [k[1] for k in _rows(doc) if k[0] == "eve"] == ["m=int8,v=fp32", "m=int4,v=int8", "m=bf16,v=fp32"]
    doc = _json(capsys, "--config", "gpt2-124m", "--state", "all")
    assert [k[1] for k in _rows(doc) if k[0] == "eve"] == [str(f) for f in ALL_FORMATS]


def test_bad_state_names_the_valid_formats(capsys):
    for bad, why in (("m=int3", "m format must be one of fp32, bf16, int8, int4, got 'int3'"),
                     ("v=int4", "v format must be one of fp32, bf16, int8, got 'int4'"),
                     ("x=int8", "'x' is neither m nor v")):
        err = refused(capsys, "--config", "gpt2-124m", "--state", bad)
        assert f"argument --state: invalid state format {bad!r}: {why}" in err
        assert "M one of fp32, bf16, int8, int4 and V one of fp32, bf16, int8" in err


def test_pure_bf16_parameters_halve_adamw_only(capsys):
    doc = _json(capsys, "--config", "llama2-7b", "--param-dtype", "bf16")
    rows = _rows(doc)
    assert doc["param_dtype"] == "bf16" and doc["bytes_per_state"] == 4
    adamw = rows["adamw", "m=bf16,v=bf16"]
    assert adamw["total_bytes"] == 2 * 2 * LLAMA2_7B and adamw["bytes_per_param"] == 4.0
    fp32 = _rows(_json(capsys, "--config", "llama2-7b"))
    for key, row in rows.items():                                  # every other row keeps fp32 state
        if key[0] != "adamw":
            assert row["total_bytes"] == fp32[key]["total_bytes"], key
            assert row["total_saved"] == round(1 - row["total_bytes"] / (4 * LLAMA2_7B), 6), key
    err = refused(capsys, "--config", "llama2-7b", "--param-dtype", "bf16", "--bytes-per-state", "2")
    assert "--bytes-per-state 2 applies to fp32 parameters" in err and "--state m=bf16,v=bf16" in err
    assert "invalid choice: 'fp16'" in refused(capsys, "--config", "llama2-7b", "--param-dtype", "fp16")


def test_every_preset_in_every_format_and_adamw_in_both_dtypes_without_flags(capsys):
    doc = _json(capsys, "--config", "llama2-7b")
    grid = doc["by_format"]
    assert grid["adamw"]["fp32"]["bytes_per_param"] == 8.0 and grid["adamw"]["bf16"]["bytes_per_param"] == 4.0
    assert [(r["name"], r["state"]) for r in grid["optimizers"]] == \
        [(n, f.to_json()) for n in PRESET_ROWS for f in ALL_FORMATS]
    library = estimate_state_memory(build_config_model("llama2-7b"), optimizers=tuple(PRESET_ROWS), formats=ALL_FORMATS)
    assert grid["optimizers"] == library.to_json()["optimizers"][1:]
    code, out, err = memory(capsys, "--config", "llama2-7b")
    lines = out.split("Bytes per parameter in each state format (m, kept v)\n")[1].splitlines()
    assert lines[0] == "torch AdamW: 8.000 with fp32 parameters, 4.000 with bf16 parameters"
    cells = {line.split()[0]: line.split()[2::2] for line in lines[3:15]}       # state │ x │ y …
    assert list(cells) == [str(f) for f in ALL_FORMATS]
    for fmt in ALL_FORMATS:
        assert cells[str(fmt)] == [f"{library[name, fmt].total_bytes / LLAMA2_7B:.3f}" for name in PRESET_ROWS]


def test_the_readme_shows_the_format_table_as_the_command_prints_it(capsys):
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code, out, _ = memory(capsys, "--config", "llama2-7b")
    grid = out[out.index("Bytes per parameter in each state format"):]
    assert code == 0 and f"```\n{grid}```\n" in readme


# -- peak training memory (--peak, --batch, --seq, --fit, ...) ---------------------------------

def test_no_peak_table_unless_asked(capsys):
    code, out, _ = memory(capsys, "--example", "shakespeare", "--format", "json")
    assert code == 0 and json.loads(out)["peak"] is None


def test_peak_rows_are_the_traced_peaks_of_each_optimizer(capsys):
    import torch

    from lowmem.compress.peak import resized_batch, trace_peak
    from lowmem.examples import shakespeare

    code, out, err = memory(capsys, "--example", "shakespeare", "--batch", 8, "--fit", "64MiB", "--format", "json")
    assert code == 0, err
    peak = json.loads(out)["peak"]
    rows = {r["optimizer"]: r for r in peak["rows"]}
    from lowmem.compress.optim.registry import PEERS
    peers = [n for n in ("torchao-adamw8bit", "torchao-adamw4bit", "bnb-adamw8bit") if not PEERS[n].unavailable()]
    assert list(rows) == ROWS + ["muon", *peers]          # the registry, AdamW first, then the peers
    for name in peers:                                    # traced (maps made real, step run eagerly)
        assert rows[name]["error"] is None and rows[name]["state"] < rows["adamw"]["state"] / 3
    assert (peak["batch"], peak["seq"], peak["budget"]) == (8, None, 64 * 2**20)
    whole = trace_peak(shakespeare.build_model, lambda: resized_batch(shakespeare.get_batch(0), 8),
                       shakespeare.loss_fn, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True))
    assert 0 <= whole.peak - rows["adamw"]["peak"] <= 1024   # the whole steps keep the scalar loss too
    assert rows["eve"]["state"] < rows["adamw"]["state"]
    for r in rows.values():
        if r["error"] is None:
            assert r["largest_batch_peak"] <= 64 * 2**20 and r["largest_batch"] >= 1
    # Adafactor with momentum reads no tensor values in its step (no .item()): traced like the
    # others, its state by hand (a matrix's row and column statistics, a vector's own, a momentum
    # per entry, and a float32 step counter per tensor)
    from lowmem.compress.optim.adamem import adafactor_state_numel
    model = shakespeare.build_model()
    tensors = len(list(model.parameters()))
    assert rows["adafactor-momentum"]["error"] is None
    assert rows["adafactor-momentum"]["state"] == 4 * adafactor_state_numel(model) + 4 * tensors


def test_peak_text_table_names_the_settings(capsys):
    code, out, err = memory(capsys, "--example", "shakespeare", "--batch", 4, "--seq", 64, "--param-dtype", "bf16",
                            "--autocast", "bf16", "--activation-checkpointing", "--fit", "24MiB")
    assert code == 0, err
    text = " ".join(out.split())            # the title wraps at the console's width
    assert "Peak memory of one training step of example 'shakespeare' (batch 4 x 64, bf16 parameters, autocast " \
           "bf16, activation checkpointing); the largest micro-batch within 24.00 MiB" in text
    assert "max batch" in out and "adafactor-momentum" in out and "cannot trace" not in out   # every row traced


def test_peak_of_a_config_is_next_token_loss_on_its_positions(capsys):
    code, out, err = memory(capsys, "--config", "gpt2-124m", "--seq", 32, "--format", "json")
    assert code == 0, err
    peak = json.loads(out)["peak"]
    assert (peak["batch"], peak["seq"]) == (1, 32)
    assert peak["rows"][0]["inputs"] == 32 * 8             # 32 token ids, int64


def test_peak_of_a_model_py_and_its_bad_inputs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = memory(capsys, "model.py", "--peak", "--batch", 1000, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)["peak"]["rows"]
    assert rows[0]["inputs"] == 16000 + 8000       # x (1000 x 4) and y (1000 x 2), fp32
    assert "invalid size" in refused(capsys, "model.py", "--fit", "12XB")
    assert "longer than gpt2-124m's 1024 positions" in refused(capsys, "--config", "gpt2-124m", "--seq", 2048)
    (tmp_path / "sync.py").write_text(MODEL.replace("return nn.functional.mse_loss(model(x), y)",
                                                    "loss = nn.functional.mse_loss(model(x), y)\n"
                                                    "    print(loss.item())\n    return loss"))
    code, out, err = memory(capsys, "sync.py", "--peak")
    assert code == 3 and out == "" and "Traceback" not in err
    assert "needs tensor values at sync.py:" in err and "print(loss.item())" in err
    code, out, err = memory(capsys, "model.py", "--activation-checkpointing")
    assert code == 3 and "longest nn.ModuleList" in err


def test_loss_gaps_from_a_compare_sweep_join_the_peak_rows(capsys, tmp_path):
    # each optimizer's best held-out loss over its rates minus AdamW's best; a diverged run left out
    rows = [("adamw", 1e-3, "complete", 2.50), ("adamw", 3e-3, "complete", 2.45), ("eve", 1e-3, "complete", 2.47),
            ("eve", 3e-3, "diverged", 1.00), ("eve:int8", 1e-3, "complete", 2.49), ("mine:Sign", 1e-3, "complete", 2.60)]
    lines = ["optimizer,lr,status,steps_done,final_train_loss,final_val_loss,state_bytes,step_seconds"]
    lines += [f"{o},{lr},{st},10,3.0,{v},{4321 if o == 'mine:Sign' else 100},0.1" for o, lr, st, v in rows]
    (tmp_path / "compare.csv").write_text("\n".join(lines) + "\n")
    code, out, err = memory(capsys, "--example", "shakespeare", "--compare", tmp_path, "--state", "fp32,m=int8",
                            "--format", "json")
    assert code == 0, err
    gaps = {r["optimizer"]: r["loss_gap"] for r in json.loads(out)["peak"]["rows"]}
    assert gaps["adamw"] == 0.0
    assert gaps["eve"] == pytest.approx(2.47 - 2.45) and gaps["eve:int8"] == pytest.approx(2.49 - 2.45)
    assert gaps["slimadam:int8"] is None                   # not in the sweep
    # a candidate memory does not build (a module:Class, another package's) keeps its row: its gap,
    # no trace, and the state the sweep measured, in the JSON and in the table
    mine = next(r for r in json.loads(out)["peak"]["rows"] if r["optimizer"] == "mine:Sign")
    assert mine["loss_gap"] == pytest.approx(2.60 - 2.45) and mine.get("peak") is None
    assert "not traced" in mine["error"] and "4,321 bytes" in mine["error"]
    code, out, err = memory(capsys, "--example", "shakespeare", "--compare", tmp_path)
    assert code == 0, err
    assert "mine:Sign" in out and "+0.150" in out and "4,321 bytes" in out
    assert "no such file" in refused(capsys, "--example", "shakespeare", "--compare", tmp_path / "nothing")


def test_per_rank_figures_under_fsdp2(capsys):
    code, out, err = memory(capsys, "--example", "shakespeare", "--world", 4, "--format", "json")
    assert code == 0, err
    peak = json.loads(out)["peak"]
    one = {r["optimizer"]: r for r in peak["rows"]}
    assert peak["world"] == 4
    code, out, _ = memory(capsys, "--example", "shakespeare", "--peak", "--format", "json")
    full = {r["optimizer"]: r for r in json.loads(out)["peak"]["rows"]}
    assert one["adamw"]["state"] < 0.3 * full["adamw"]["state"]      # a quarter, give or take rounding


MLP_MODEL = '''\
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))

def get_batch(step):
    return torch.randn(2048, 512), torch.zeros(2048, dtype=torch.long)

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measurement reads /proc")
def test_measured_real_steps_agree_with_the_trace(tmp_path, monkeypatch):
    # Two real steps per optimizer in a fresh process each (lowmem.cli.measure): their peak
    # resident set counts every page the step touched, the trace the tensors alone; on a model
    # whose step peaks above 50 MiB they agree within 3%, as in tests/compress/test_peak.py.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MLP_MODEL)
    from lowmem.cli.contract import load_task
    from lowmem.cli.measure import measure_rows
    from lowmem.cli.peak import peak_optimizers, trace_task

    task = load_task("model.py")
    optimizers = {k: v for k, v in peak_optimizers(None, None).items() if k in ("adamw", "adam-mini")}
    report = trace_task(task, task.get_batch(0), optimizers)
    traced = {r.name: r.memory.peak for r in report.rows}
    spec = {"target": "model.py", "batch": None, "seq": None, "param_dtype": "fp32"}
    measured = measure_rows(spec, {**traced, "untraced": None}, torch.device("cpu"))
    for name, peak in traced.items():
        assert peak > 50 * 2**20
        assert abs(measured[name]["allocated"] - peak) <= 0.03 * peak, (name, measured[name], peak)
    assert "not traced" in measured["untraced"]["note"]
    too_big = measure_rows(spec, {"adamw": 2**60}, torch.device("cpu"))["adamw"]["note"]
    assert "free" in too_big and "not run" in too_big
    # the table shows them beside the trace, and their ratio
    import io

    from rich.console import Console

    from lowmem.reports.terminal import PeakTable

    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(PeakTable(report.with_measurements(measured, "cpu"), "m"))
    text = buf.getvalue()
    assert "measured" in text and "two real steps on cpu" in text
    assert f"{measured['adamw']['allocated'] / traced['adamw']:.3f}" in text


def test_measure_refuses_what_it_cannot_measure(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL)
    assert "2 devices" in refused(capsys, "model.py", "--measure", "--world", "2")
    assert "not a device" in refused(capsys, "model.py", "--measure", "--device", "nonsense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_on_cuda_beside_the_trace(tmp_path, monkeypatch):
    # On CUDA: max_memory_allocated after a warm-up, within 30% of the trace (the CUDA kernels
    # differ from the CPU ones the trace sees: BENCHMARKS.md), and reserved at least allocated.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MLP_MODEL)
    from lowmem.cli.contract import load_task
    from lowmem.cli.measure import measure_rows
    from lowmem.cli.peak import peak_optimizers, trace_task

    task = load_task("model.py")
    report = trace_task(task, task.get_batch(0), {"adamw": peak_optimizers(None, None)["adamw"]})
    peak = report.rows[0].memory.peak
    got = measure_rows({"target": "model.py", "param_dtype": "fp32"}, {"adamw": peak}, torch.device("cuda"))["adamw"]
    assert abs(got["allocated"] - peak) <= 0.3 * peak, (got, peak)
    assert got["reserved"] >= got["allocated"]
