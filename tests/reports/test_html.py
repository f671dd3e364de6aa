"""The HTML report and `lowmem-analyze report`: a real run folder (a tiny model trained by the CLI,
its Hessian blocks, a comparison written in the documented CSV schema) read back and checked with
a real HTML parser against the files and against numbers recomputed here."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from torch import nn

from cli_runner import cli
from lowmem.compress import model_record, slimadam_rules
from lowmem.compress.memory import MemoryRow, format_bytes
from lowmem.layers import resolve_layers
from lowmem.reports import figures
from lowmem.reports.html import render_report, script_json, write_report
from lowmem.reports.run import COMPARE_COLUMNS, CURVE_COLUMNS, LayerSnr, SubsetSnr, read_run
from lowmem.snr.keys import SnrKey
from tiny_models import SOURCE

ODD = "blk<b>&amp;"        # a module name that is HTML: it must come out as text
MODEL = SOURCE + f'''\
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.c_fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.c_proj = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.c_proj(torch.tanh(self.c_fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([Block(), Block(), Block()])
        self.add_module({ODD!r}, nn.Linear(WIDTH, WIDTH, bias=False))

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return getattr(self, {ODD!r})(x)


def build_model():
    return Net()


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, T, WIDTH, generator=g)
    return x, torch.roll(x, 1, dims=1)


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)

LOWMEM = {{"steps": 40, "every": 4, "lr": 3e-3}}
'''


# Comparison results in the documented schema (lowmem.reports.run), written by hand: AdamW and
# SlimAdam over three learning rates, SlimAdam diverging at the highest.
COMPARE = [
    ("adamw", 1e-3, "complete", 20, 0.90, 0.95, 1000, 0.010),
    ("adamw", 3e-3, "complete", 20, 0.70, 0.75, 1000, 0.010),
    ("adamw", 1e-2, "complete", 20, 0.80, 0.85, 1000, 0.010),
    ("slimadam", 1e-3, "complete", 20, 0.92, 0.97, 600, 0.012),
    ("slimadam", 3e-3, "complete", 20, 0.71, 0.78, 600, 0.012),
    ("slimadam", 1e-2, "diverged", 7, float("nan"), None, 600, 0.012),
]


def _write_compare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COMPARE_COLUMNS)
        for row in COMPARE:
            w.writerow(["" if x is None else x for x in row])
    with open(folder / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for opt, lr, *_ in COMPARE:
            for step in range(0, 21, 5):
                w.writerow([opt, lr, step, 2.0 / (1 + step * lr * 100), "", 0.0 if opt == "adamw" else step * 0.01])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real analysis of the tiny model, its Hessian blocks and a comparison, in one folder."""
    root = tmp_path_factory.mktemp("report")
    (root / "model.py").write_text(MODEL)
    out = root / "out"
    code, stdout, err = cli(root / "model.py", "--out", out)
    assert code == 0, err
    code, _, err = cli("hessian", root / "model.py", "--block", "h.0.attn.q.weight", "--block", "h.1.c_fc.weight",
                       "--out", out / "hessian")
    assert code == 0, err
    _write_compare(out / "compare")
    write_report(read_run(out))
    return out


class _Page(HTMLParser):
    """Every element with its attributes, the ids, the text, and the content of each <script>."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script: str | None = None
        self._style = False
        self.styles: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if tag == "script":
            self._script = a.get("id", f"anonymous-{len(self.scripts)}")
            self.scripts[self._script] = ""
        self._style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None
        self._style = False

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data
        elif self._style:
            self.styles.append(data)
        else:
            self.text.append(data)


@pytest.fixture(scope="module")
def page(run_dir) -> _Page:
    return _Page((run_dir / "report.html").read_text())


def test_analysis_writes_every_file_a_report_needs(run_dir):
    for name in ("plan.json", "snr.csv", "precision.csv", "layers.json", "memory.json", "report.html"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp"))        # atomic writes leave no temporary behind


def test_report_links_nothing_outside_itself(page):
    for tag, attrs in page.tags:
        assert tag != "link", attrs
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,"), (tag, attrs["src"][:60])
        if "href" in attrs:
            assert attrs["href"].startswith("#"), (tag, attrs["href"])
        if tag == "script":
            assert "src" not in attrs
    css = "".join(page.styles)
    assert "url(" not in css and "@import" not in css


def test_every_anchor_resolves(page):
    anchors = [a["href"][1:] for _, a in page.tags if a.get("href", "").startswith("#")]
    assert len(anchors) >= 7                                    # the navigation and the Hessian table
    assert [a for a in anchors if a not in page.ids] == []


def test_each_expected_section_is_present(page):
    for section in ("summary", "decision", "plan", "state", "snr-heatmap", "snr-depth", "trajectories", "hessian",
                    "compare"):
        assert section in page.ids, section


def test_names_that_look_like_html_are_escaped(run_dir, page):
    raw = (run_dir / "report.html").read_text()
    name = f"{ODD}.weight"
    assert name in "".join(page.text)                  # shown as the literal text
    assert ODD not in raw                              # never as markup
    assert not any(tag == "b" for tag, _ in page.tags)


def test_embedded_plan_equals_plan_json(run_dir, page):
    assert json.loads(page.scripts["lowmem-plan"]) == json.loads((run_dir / "plan.json").read_text())


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_figure_is_a_png_of_its_stated_size_with_content(page):
    images = [a for tag, a in page.tags if tag == "img"]
    # memory, heatmap, depth, trajectories, 2 Hessian blocks, loss vs lr, best-lr curves, distance
    assert len(images) == 9
    for a in images:
        data = base64.b64decode(a["src"].split(",", 1)[1])
        assert _png_size(data) == (int(a["width"]), int(a["height"]))
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels[..., :3].std() > 0.02, a["alt"]       # not a blank canvas
        assert a["alt"]


def test_viewer_data_is_the_trajectory_csv(run_dir, page):
    """Every series the in-page viewer draws is its (name, view, subset) rows of snr.csv, step by
    step (to the 4 digits it keeps), and covers every candidate subset of every layer."""
    viewer = json.loads(page.scripts["lowmem-snr"])
    rows = list(csv.DictReader(open(run_dir / "snr.csv")))
    series: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        series.setdefault((r["name"], r["view"], r["subset"]), {})[int(r["step"])] = float(r["snr"])
    assert {layer["label"] for layer in viewer["layers"]} == {r["name"] for r in rows}
    drawn = 0
    for layer in viewer["layers"]:
        for s in layer["subsets"]:
            expected = series[(layer["label"], s["view"], s["subset"])]
            assert s["steps"] == sorted(expected)
            np.testing.assert_allclose(s["values"], [expected[k] for k in s["steps"]], rtol=5e-4)
            drawn += 1
    # q of each block: raw fan_out, fan_in, both; heads view fan_out/fan_in/both per head = 6.
    q = next(layer for layer in viewer["layers"] if layer["label"] == "h.0.attn.q.weight")
    assert sorted(s["words"] for s in q["subsets"]) == sorted(
        ["fan_out", "fan_in", "fan_out+fan_in", "fan_out per head", "fan_in per head", "fan_out+fan_in per head"])
    assert drawn > 30


def test_time_means_are_the_csv_means_over_the_plan_window(run_dir):
    """layer_snr's means against a plain average of the CSV rows of the chosen subset."""
    run = read_run(run_dir)
    from lowmem.reports.run import layer_snr

    rows = list(csv.DictReader(open(run_dir / "snr.csv")))
    for layer in layer_snr(run.layers, run.trajectory):
        if layer.name != "h.1.attn.q.weight":
            continue
        fan_in = layer.subsets["fan_in"]
        expected = np.mean([float(r["snr"]) for r in rows
                            if r["name"] == layer.name and r["view"].startswith("raw:") and r["subset"] == "1"])
        assert fan_in.mean == pytest.approx(expected, rel=1e-12)
        assert run.plan.layers[layer.name].snr[SnrKey("raw", (1,))] == pytest.approx(expected, abs=1e-6)   # rounded to 6


def _table_rows(html: str, table_id: str) -> list[list[str]]:
    """The cell texts of each body row of one table, read with the HTML parser."""
    start = html.index(f'id="{table_id}"')
    chunk = html[html.rindex("<table", 0, start):html.index("</table>", start)]
    cells: list[list[str]] = []

    class _Rows(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.in_body = self.in_cell = False

        def handle_starttag(self, tag, attrs):
            if tag == "tbody":
                self.in_body = True
            elif tag == "tr" and self.in_body:
                cells.append([])
            elif tag == "td" and self.in_body:
                self.in_cell = True
                cells[-1].append("")

        def handle_endtag(self, tag):
            self.in_cell = self.in_cell and tag != "td"

        def handle_data(self, data):
            if self.in_cell:
                cells[-1][-1] += data

    _Rows().feed(chunk)
    return [[c.strip() for c in row] for row in cells]


class _TiedGPT(nn.Module):
    """A GPT's ends: the LM head shares the token embedding's weight."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.h = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight


def test_plan_table_shows_the_other_name_of_a_tied_weight(tmp_path):
    model = _TiedGPT()
    (tmp_path / "layers.json").write_text(json.dumps({**resolve_layers(model, warn=False).to_json(),
                                                      "model": model_record(model)}))
    slimadam_rules(model).save(tmp_path / "plan.json")
    rows = {r[0]: r for r in _table_rows(render_report(read_run(tmp_path)), "plan-table") if len(r) > 1}   # not role rows
    # The name cell is the name, then the note on its own line: "wte.weight" + "tied: lm_head.weight".
    assert sorted(rows) == ["h.bias", "h.weight", "wte.weighttied: lm_head.weight"]
    assert rows["wte.weighttied: lm_head.weight"][1] == "embedding"


def test_memory_table_matches_hand_arithmetic(run_dir):
    """AdamW keeps 2 fp32 entries per parameter; the plan keeps m plus the product of the kept
    dims of each layer's view: recomputed from plan.json's views here."""
    plan = json.loads((run_dir / "plan.json").read_text())
    n = sum(int(np.prod(lp["shape"])) for lp in plan["layers"].values())

    def kept(view, reduce):
        return int(np.prod([d for i, d in enumerate(view) if reduce is None or i not in reduce]))

    def v_kept(lp):
        return sum(kept(p["view"], p["reduce"]) for p in lp["parts"]) if lp.get("parts") else kept(lp["view"], lp["reduce"])

    size = {"fp32": 4, "bf16": 2}   # the tiny model's tensors are all too small to quantize
    state = {name: lp.get("state") or {"m": "fp32", "v": "fp32"} for name, lp in plan["layers"].items()}
    assert {f for s in state.values() for f in s.values()} <= set(size)
    plan_bytes = sum(int(np.prod(lp["shape"])) * size[state[name]["m"]] + v_kept(lp) * size[state[name]["v"]]
                     for name, lp in plan["layers"].items())
    rows = {r[0]: r for r in _table_rows((run_dir / "report.html").read_text(), "memory-table")}
    assert list(rows)[0] == "adamw" and list(rows)[-1] == "plan"
    memory = {r["name"]: r for r in json.loads((run_dir / "memory.json").read_text())["optimizers"]}
    assert memory["adamw"]["total_bytes"] == 8 * n
    assert memory["plan"]["total_bytes"] == plan_bytes
    # The page prints them in binary units: KiB here (n is a few thousand).
    assert rows["adamw"][3] == f"{8 * n / 1024:.2f} KiB"
    assert rows["plan"][3] == f"{plan_bytes / 1024:.2f} KiB"
    v_bytes = sum(v_kept(lp) * size[state[name]["v"]] for name, lp in plan["layers"].items())
    assert rows["plan"][4] == f"{1 - v_bytes / (4 * n):.1%}"                 # v's bytes against AdamW's


def test_state_table_is_plan_json_and_the_worst_errors_of_precision_csv(run_dir, page):
    """Each layer's formats are plan.json's, its bytes per parameter follow from them by hand (the
    tiny model's tensors are all too small to quantize: fp32 4 B, bf16 2 B; an averaged v keeps its
    kept entries in fp32), each error is the largest of its rows in precision.csv over the plan's
    window, and the whole model's bytes per parameter is their weighted sum."""
    plan = json.loads((run_dir / "plan.json").read_text())
    start, end = plan["source"]["window"]
    worst: dict[tuple[str, str, str], float] = {}
    for r in csv.DictReader(open(run_dir / "precision.csv")):
        if start <= int(r["step"]) <= end:
            key = (r["name"], r["state"], r["format"])
            worst[key] = max(worst.get(key, 0.0), float(r["update_error"]))
    size = {"fp32": 4, "bf16": 2}
    rows = {r[0]: r for r in _table_rows((run_dir / "report.html").read_text(), "state-table")}
    assert set(rows) == set(plan["layers"])
    total = n_all = 0
    for name, lp in plan["layers"].items():
        n = int(np.prod(lp["shape"]))
        kept = int(np.prod([d for i, d in enumerate(lp["view"]) if lp["reduce"] is None or i not in lp["reduce"]]))
        m_bytes = n * size[lp["state"]["m"]]
        v_bytes = n * size[lp["state"]["v"]] if kept == n else 4 * kept
        total, n_all = total + m_bytes + v_bytes, n_all + n
        row = rows[name]
        assert row[1:5] == ["×".join(map(str, lp["shape"])), lp["state"]["m"], lp["state"]["v"],
                            f"{(m_bytes + v_bytes) / n:.2f}"], name
        assert row[5] == f"{worst[(name, 'm', 'bf16')]:.2%}" and row[8] == f"{worst[(name, 'v', 'bf16')]:.2%}", name
        assert row[6] == row[7] == row[9] == "—", name                      # int formats: not measured here
    assert "".join(page.text).count(f"{total / n_all:.2f} bytes per parameter") == 1


def test_compare_section_shows_best_lr_gap_and_divergence(run_dir):
    run = read_run(run_dir)
    # Held-out loss decides: AdamW best at 3e-3 (0.75), SlimAdam at 3e-3 (0.78); 1e-2 diverged.
    assert figures.best_learning_rates(run.compare) == {"adamw": 3e-3, "slimadam": 3e-3}
    rows = {r[0]: r for r in _table_rows(render_report(run), "compare-table")}
    assert rows["adamw"][1:4] == ["0.9500", "0.7500", "0.8500"]
    assert rows["slimadam"][1:4] == ["0.9700 (+0.0200)", "0.7800 (+0.0300)", "diverged"]    # gaps by hand
    assert rows["slimadam"][4] == "0.003" and rows["adamw"][4] == "0.003"
    assert rows["slimadam"][5] == "600 B" and rows["adamw"][6] == "10.0 ms"


def test_decision_table_is_peak_json_and_the_best_gaps_of_compare_csv(run_dir):
    # Each traced optimizer's state and peak as peak.json has them (the analysis traced them), the
    # plan's among them; loss gaps by hand from COMPARE: best held-out loss 0.78 - 0.75 for
    # SlimAdam, 0 for AdamW, nothing for the optimizers the sweep did not train.
    peak = json.loads((run_dir / "peak.json").read_text())
    traced = {r["optimizer"]: r for r in peak["rows"]}
    assert {"adamw", "slimadam", "plan", "muon"} <= set(traced) and peak["param_dtype"] == "fp32"
    rows = {r[0]: r for r in _table_rows(render_report(read_run(run_dir)), "decision-table")}
    assert list(rows) == list(traced)
    for name, r in traced.items():
        if r["error"]:
            assert rows[name][2] == "—"
            continue
        assert rows[name][1] == format_bytes(r["state"]) and rows[name][2] == format_bytes(r["peak"])
        assert rows[name][3] == f"{r['peak'] / traced['adamw']['peak'] - 1:+.1%}"
    assert rows["slimadam"][-1] == "+0.0300" and rows["adamw"][-1] == "+0.0000" and rows["plan"][-1] == ""
    assert traced["adamw"]["state"] > traced["plan"]["state"] and traced["adamw"]["peak"] > traced["plan"]["peak"]
    # AdamW's state by hand: fp32 m and v of every parameter and an fp32 step counter per tensor
    from lowmem.cli.contract import load_task

    params = list(load_task(str(run_dir.parent / "model.py")).build_model().parameters())
    assert rows["adamw"][1] == format_bytes(8 * sum(p.numel() for p in params) + 4 * len(params))


def test_figures_leave_the_users_matplotlib_state_alone():
    rows = [MemoryRow("adamw", 4 << 20, 4 << 20, 8 << 20, 0.0, 0.0), MemoryRow("plan", 4 << 20, 1 << 10, (4 << 20) + 1024, 0.99, 0.49)]
    plain = figures.memory_bars(rows, "M")
    before = dict(matplotlib.rcParams)
    with matplotlib.rc_context({"axes.facecolor": "red", "font.size": 30, "lines.linewidth": 9}):
        styled = figures.memory_bars(rows, "M")
        assert matplotlib.rcParams["axes.facecolor"] == "red"      # still the user's inside their context
    assert styled.png == plain.png                                 # the user's style did not reach the figure
    assert dict(matplotlib.rcParams) == before
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []


def test_pooled_heatmap_is_the_blockwise_max_of_abs_h(tmp_path):
    rng = np.random.default_rng(0)
    shape = (6, 5)                                  # a piece of shape (in=6, out=5): out_axis 1
    d = 30
    H = rng.standard_normal((d, d))
    np.save(tmp_path / "H.npy", H)
    pooled = figures.pooled_abs(tmp_path / "H.npy", cells=4, shape=list(shape), out_axis=1)
    # Reference: permute to output-unit-major order by hand, then max over each bin.
    order = np.array([i * 5 + o for o in range(5) for i in range(6)])
    A = np.abs(H[np.ix_(order, order)])
    edges = [0, 7, 15, 22, 30]
    expected = np.array([[A[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].max() for j in range(4)] for i in range(4)])
    np.testing.assert_array_equal(pooled, expected)
    np.testing.assert_array_equal(figures.pooled_abs(tmp_path / "H.npy", cells=64), np.abs(H))   # small: unpooled


def test_many_layers_pool_into_role_depth_bins_by_median():
    layers = [LayerSnr(f"l{i}.{role}", f"l{i}.{role}", role, i, {"fan_in": SubsetSnr("fan_in", float(i + 1), [1], [1.0])})
              for role in ("attn_q", "mlp_up") for i in range(150)]
    labels, values, pooled = figures._pool_rows(layers, ["fan_in"])
    assert pooled and len(labels) == figures.MAX_HEATMAP_ROWS
    # attn_q layers 0..149 in 40 bins: the first bin holds depths 0..2 (150*1//40 = 3), median 2.
    assert labels[0] == "attn_q depth 0–2 (3)" and values[0, 0] == np.median([1.0, 2.0, 3.0])
    assert figures.snr_heatmap(layers, 1.0).height < 2000


def test_script_json_cannot_close_its_script_and_parses_back():
    value = {"name": "</script><script>alert(1)</script>", "x": "a&b"}
    text = script_json(value)
    assert "</" not in text and "<" not in text
    assert json.loads(text) == value


# -- rebuilding from files, interrupted runs, bad folders ---------------------------------------------


def test_report_command_rebuilds_views_and_html_from_the_folder(run_dir, tmp_path):
    target = tmp_path / "again.html"
    code, out, err = cli("report", run_dir, "--html", target)
    assert code == 0, err
    assert "Compression plan" in out and "Summary" in out and "Exact Hessian blocks" in out
    assert "h.0.attn.q.weight" in out
    page = _Page(target.read_text())
    assert json.loads(page.scripts["lowmem-plan"]) == json.loads((run_dir / "plan.json").read_text())


def test_killed_run_is_reported_with_a_plan_rebuilt_from_its_trajectory(run_dir, tmp_path):
    """A run killed before its plan leaves layers.json, snr.csv.part and precision.csv.part; the
    report rebuilds the same per-layer decisions (v and state formats) the finished run wrote."""
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(run_dir / "layers.json", killed)
    text = (run_dir / "snr.csv").read_text()
    (killed / "snr.csv.part").write_text(text + "40,h.0.attn.q.weight,8x8,raw:8")    # a torn last line
    text = (run_dir / "precision.csv").read_text()
    (killed / "precision.csv.part").write_text(text + "40,h.0.attn.q.weight,8x8,m,bf")
    code, out, err = cli("report", killed)
    assert code == 0, err
    assert "did not finish" in err and "rebuilt" in err
    page = _Page((killed / "report.html").read_text())
    rebuilt = json.loads(page.scripts["lowmem-plan"])
    original = json.loads((run_dir / "plan.json").read_text())
    assert rebuilt["layers"] == original["layers"]
    assert rebuilt["model"] == original["model"]
    assert "interrupted" in "".join(page.text)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "holds no plan.json, snr.csv or compare.csv"),
    (lambda d: (d / "plan.json").write_text("{not json"), "plan.json"),
    (lambda d: (d / "snr.csv").write_text("step,name\n1,x\n"), "snr.csv: line 1"),
])
def test_bad_run_folders_exit_2_naming_the_file(tmp_path, setup, message):
    folder = tmp_path / "run"
    folder.mkdir()
    setup(folder)
    code, out, err = cli("report", folder)
    assert code == 2
    assert message in err and out == ""
    assert not (folder / "report.html").exists()


def test_missing_folder_exits_2(tmp_path):
    code, _, err = cli("report", tmp_path / "nope")
    assert code == 2 and "is not a folder" in err


def test_no_html_flag_writes_nothing(run_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("report.html", "hessian", "compare"))
    code, out, _ = cli("report", folder, "--no-html", "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["report"] is None and doc["measurements"] == 10 and not (folder / "report.html").exists()


def test_fused_qkv_parts_have_their_own_rows_and_decisions(tmp_path):
    """The built-in binary example has GPT-2's fused c_attn: its q, k and v parts are separate
    rows of the heatmap and viewer, and the plan row states each part's decision."""
    out = tmp_path / "bin"
    code, _, err = cli("--example", "binary", "--steps", "8", "--every", "4", "--out", out, "-q")
    assert code == 0, err
    page = _Page((out / "report.html").read_text())
    viewer = json.loads(page.scripts["lowmem-snr"])
    labels = [layer["label"] for layer in viewer["layers"]]
    name = "transformer.h.0.attn.c_attn.weight"
    assert [f"{name} [q]", f"{name} [k]", f"{name} [v]"] == [l for l in labels if l.startswith(name)]
    roles = {layer["label"]: layer["role"] for layer in viewer["layers"]}
    assert roles[f"{name} [k]"] == "attn_k"
    plan = json.loads((out / "plan.json").read_text())
    row = next(r for r in _table_rows((out / "report.html").read_text(), "plan-table") if r[0] == name)
    for part in plan["layers"][name]["parts"]:
        assert f"{part['name']}: " in row[6]          # "q: avg 1, k: full, …" as the terminal shows
    assert json.loads(page.scripts["lowmem-plan"]) == plan


def test_dollar_signs_in_names_are_text_not_math():
    layer = LayerSnr("a$_$b.weight", "a$_$b.weight", "mlp_up", 0,
                     {"fan_in": SubsetSnr("fan_in", 2.0, [1, 2], [1.5, 2.5])})
    assert figures.snr_trajectories([layer], 1.0).width > 0
    assert figures.snr_heatmap([layer], 1.0).width > 0


def test_malformed_compare_csv_exits_2_naming_line_and_column(run_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("report.html", "hessian"))
    text = (folder / "compare" / "compare.csv").read_text().splitlines()
    text[2] = text[2].replace("0.003", "auto")
    (folder / "compare" / "compare.csv").write_text("\n".join(text) + "\n")
    code, out, err = cli("report", folder)
    assert code == 2 and "compare.csv: line 3: column lr must be a number, found 'auto'" in err


def test_a_new_run_replaces_an_earlier_runs_files(run_dir, tmp_path):
    """A preset written into a probe's folder leaves no stale trajectory for the report to mix in."""
    folder = tmp_path / "reuse"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("hessian", "compare"))
    code, _, err = cli(run_dir.parent / "model.py", "--preset", "eve", "--out", folder, "-q")
    assert code == 0, err
    assert not (folder / "snr.csv").exists() and not (folder / "precision.csv").exists()
    page = _Page((folder / "report.html").read_text())
    assert json.loads(page.scripts["lowmem-plan"])["source"]["preset"] == "eve"
    assert "lowmem-snr" not in page.scripts and "snr-heatmap" not in page.ids


# -- a real browser ----------------------------------------------------------------------------------

import os  # noqa: E402

import browser  # noqa: E402  (tests/reports/browser.py: headless Chromium over the DevTools pipe)


@pytest.mark.skipif(browser.CHROMIUM is None and not os.environ.get("LOWMEM_REQUIRE_BROWSER"),
                    reason="no Chromium here (.ci/run installs Debian's chromium and requires this test)")
def test_report_renders_in_headless_chromium_without_errors(run_dir, tmp_path):
    shot = Path(os.environ.get("LOWMEM_SCREENSHOT_DIR", tmp_path)) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page = browser.render_page(run_dir / "report.html", shot, width=1280)
    assert page.console_errors == []
    assert page.requests == []                       # nothing fetched: the page is self-contained
    assert page.anchors_ok is True
    imgs = [i for i in page.images if i["tag"] == "img"]
    assert len(imgs) == 9
    for i in imgs:
        assert i["complete"] and i["natural_width"] > 0 and i["natural_height"] > 0, i
        assert i["width"] > 100 and i["height"] > 100, i
    # The trajectory viewer is drawn by the page's own script: its SVG exists and has a size.
    svgs = [i for i in page.images if i["tag"] == "svg"]
    assert len(svgs) == 1 and svgs[0]["width"] > 100 and svgs[0]["height"] > 100
    assert _png_size(shot.read_bytes())[1] > 2000    # the whole page, not one viewport


@pytest.mark.skipif(browser.CHROMIUM is None and not os.environ.get("LOWMEM_REQUIRE_BROWSER"),
                    reason="no Chromium here (.ci/run installs Debian's chromium and requires this test)")
def test_viewer_draws_with_threshold_zero(run_dir, tmp_path):
    """log10(0) must not reach the axis loop of the viewer (it once spun forever)."""
    folder = tmp_path / "t0"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("report.html", "hessian", "compare"))
    plan = json.loads((folder / "plan.json").read_text())
    plan["source"]["threshold"] = 0
    (folder / "plan.json").write_text(json.dumps(plan))
    write_report(read_run(folder))
    page = browser.render_page(folder / "report.html", timeout=60)
    assert page.console_errors == []
    assert [i["width"] for i in page.images if i["tag"] == "svg"] == [760]


def test_heatmap_caption_calls_a_cell_a_measurement_not_a_decision():
    # A norm above the threshold keeps full Adam: the caption must not say its blue cell compresses.
    layers = [LayerSnr("ln.weight", "ln.weight", "norm", 0, {"model": SubsetSnr("model", 3.0, [1], [3.0])})]
    caption = figures.snr_heatmap(layers, 1.0).caption
    assert "compresses" not in caption and "not a decision" in caption and "norms keep full Adam" in caption
