"""timm and torchvision models, built from their own classes (random init, no download): what
lowmem reads every parameter as, against expectations written from each library's modeling code;
which rows of a fused Q/K/V weight are the values, by what the model computes; and every memory
row's estimate against the bytes of the real state after one real training step.

Their wheels need a torch other than the CPU build this suite runs on (PyPI's torchvision fails to
import beside it: `operator torchvision::nms does not exist`), so the models run in another
Python: the one `LOWMEM_VISION_PYTHON` names, with torch 2.14.1, torchvision 0.29.1, timm and
lowmem installed (`.ci/run` makes it as `.venv-vision`, a CUDA build of torch that runs on the
CPU). Without it these tests skip, unless `LOWMEM_REQUIRE_VISION=1` (CI) makes that a failure."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Per model: (pattern of names, role, axes), each name matched by exactly one pattern. Written
# from the libraries' code: nn.Linear (out, in), Conv2d (out, in, kh, kw), a Sequential's members
# by index (torchvision's MLPBlock: Linear 0, GELU, Dropout, Linear 3; CNBlock: dwconv 0, Permute,
# LayerNorm 2, Linear 3, GELU, Linear 5, Permute).
LINEAR, CONV, VEC = ("out", "in"), ("out", "in", "kh", "kw"), ("out",)
NORM = ("model",)
VIT_BLOCK = [
    (r"(blocks|layers\.\d+\.blocks)\.\d+\.norm[12]\.(weight|bias)", "norm", NORM),
    (r"(blocks|layers\.\d+\.blocks)\.\d+\.attn\.qkv\.weight", "attn_qkv", LINEAR),
    (r"(blocks|layers\.\d+\.blocks)\.\d+\.attn\.proj\.weight", "attn_out", LINEAR),
    (r"(blocks|layers\.\d+\.blocks)\.\d+\.mlp\.fc1\.weight", "mlp_up", LINEAR),
    (r"(blocks|layers\.\d+\.blocks)\.\d+\.mlp\.fc2\.weight", "mlp_down", LINEAR),
    (r"(patch_embed\.proj|head|head\.fc|(blocks|layers\.\d+\.blocks)\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc[12]))\.bias",
     "bias", VEC),
]
TIMM_CONVNEXT = [
    (r"stem\.0\.weight", "conv", CONV), (r"stem\.1\.(weight|bias)", "norm", NORM),
    (r"stages\.\d\.blocks\.0\.gamma", "bias", VEC),          # layer scale, a 1-D tensor
    (r"stages\.\d\.blocks\.0\.conv_dw\.weight", "conv", CONV),
    (r"stages\.\d\.blocks\.0\.norm\.(weight|bias)", "norm", NORM),
    (r"stages\.\d\.downsample\.0\.(weight|bias)", "norm", NORM),
    (r"stages\.\d\.downsample\.1\.weight", "conv", CONV),
    (r"head\.norm\.(weight|bias)", "norm", NORM), (r"head\.fc\.weight", "lm_head", LINEAR),
    (r"(stem\.0|stages\.\d\.blocks\.0\.(conv_dw|mlp\.fc[12])|stages\.\d\.downsample\.1|head\.fc)\.bias", "bias", VEC),
]
EXPECTED = {
    "timm-vit": [
        (r"cls_token|pos_embed", "embedding", ("token", "token", "model")),
        (r"patch_embed\.proj\.weight", "conv", CONV),
        (r"norm\.(weight|bias)", "norm", NORM), (r"head\.weight", "lm_head", LINEAR), *VIT_BLOCK],
    "timm-convnext": [*TIMM_CONVNEXT,
                      (r"stages\.\d\.blocks\.0\.mlp\.fc1\.weight", "mlp_up", LINEAR),
                      (r"stages\.\d\.blocks\.0\.mlp\.fc2\.weight", "mlp_down", LINEAR)],
    "timm-convnext-conv-mlp": [*TIMM_CONVNEXT,                # the MLP as 1x1 convolutions
                               (r"stages\.\d\.blocks\.0\.mlp\.fc[12]\.weight", "conv", CONV)],
    "timm-swin": [
        (r"patch_embed\.proj\.weight", "conv", CONV), (r"patch_embed\.norm\.(weight|bias)", "norm", NORM),
        (r"layers\.\d\.blocks\.0\.attn\.relative_position_bias_table", "embedding", ("token", "head")),
        (r"layers\.1\.downsample\.norm\.(weight|bias)", "norm", NORM),
        (r"layers\.1\.downsample\.reduction\.weight", "other", LINEAR),   # patch merging: no role of ours
        (r"norm\.(weight|bias)", "norm", NORM), (r"head\.fc\.weight", "lm_head", LINEAR), *VIT_BLOCK],
    "timm-efficientnet": [
        (r"conv_stem\.weight|conv_head\.weight", "conv", CONV),
        (r"(bn[12]|blocks\.\d\.\d\.bn[123])\.(weight|bias)", "norm", NORM),
        (r"blocks\.\d\.\d\.(conv_dw|conv_pw|conv_pwl|se\.conv_reduce|se\.conv_expand)\.weight", "conv", CONV),
        (r"blocks\.\d\.\d\.se\.conv_(reduce|expand)\.bias", "bias", VEC),
        (r"classifier\.weight", "lm_head", LINEAR), (r"classifier\.bias", "bias", VEC)],
    "tv-resnet": [
        (r"conv1\.weight|layer\d\.0\.(conv[12]|downsample\.0)\.weight", "conv", CONV),
        (r"(bn1|layer\d\.0\.(bn[12]|downsample\.1))\.(weight|bias)", "norm", NORM),
        (r"fc\.weight", "lm_head", LINEAR), (r"fc\.bias", "bias", VEC)],
    "tv-vit": [
        (r"class_token|encoder\.pos_embedding", "embedding", ("token", "token", "model")),
        (r"conv_proj\.weight", "conv", CONV),
        (r"encoder\.(layers\.encoder_layer_\d\.ln_[12]|ln)\.(weight|bias)", "norm", NORM),
        (r"encoder\.layers\.encoder_layer_\d\.self_attention\.in_proj_weight", "attn_qkv", LINEAR),
        (r"encoder\.layers\.encoder_layer_\d\.self_attention\.out_proj\.weight", "attn_out", LINEAR),
        (r"encoder\.layers\.encoder_layer_\d\.mlp\.0\.weight", "mlp_up", LINEAR),
        (r"encoder\.layers\.encoder_layer_\d\.mlp\.3\.weight", "mlp_down", LINEAR),
        (r"heads\.head\.weight", "lm_head", LINEAR),
        (r"conv_proj\.bias|heads\.head\.bias|encoder\.layers\.encoder_layer_\d\.(self_attention\.in_proj_bias|"
         r"self_attention\.out_proj\.bias|mlp\.[03]\.bias)", "bias", VEC)],
    "tv-convnext": [
        (r"features\.0\.0\.weight|features\.2\.1\.weight|features\.[13]\.0\.block\.0\.weight", "conv", CONV),
        (r"features\.0\.1\.(weight|bias)|features\.2\.0\.(weight|bias)|features\.[13]\.0\.block\.2\.(weight|bias)|"
         r"classifier\.0\.(weight|bias)", "norm", NORM),
        (r"features\.[13]\.0\.layer_scale", "other", ("d0", "d1", "d2")),   # (C, 1, 1): no rule of ours
        (r"features\.[13]\.0\.block\.3\.weight", "mlp_up", LINEAR),
        (r"features\.[13]\.0\.block\.5\.weight", "mlp_down", LINEAR),
        (r"classifier\.2\.weight", "lm_head", LINEAR),
        (r"(features\.0\.0|features\.2\.1|features\.[13]\.0\.block\.[035]|classifier\.2)\.bias", "bias", VEC)],
    "tv-swin": [
        (r"features\.0\.0\.weight", "conv", CONV),
        (r"features\.0\.2\.(weight|bias)|features\.[13]\.0\.norm[12]\.(weight|bias)|features\.2\.norm\.(weight|bias)|"
         r"norm\.(weight|bias)", "norm", NORM),
        (r"features\.[13]\.0\.attn\.relative_position_bias_table", "embedding", ("token", "head")),
        (r"features\.[13]\.0\.attn\.qkv\.weight", "attn_qkv", LINEAR),
        (r"features\.[13]\.0\.attn\.proj\.weight", "attn_out", LINEAR),
        (r"features\.[13]\.0\.mlp\.0\.weight", "mlp_up", LINEAR),
        (r"features\.[13]\.0\.mlp\.3\.weight", "mlp_down", LINEAR),
        (r"features\.2\.reduction\.weight", "other", LINEAR),                # patch merging: no role of ours
        (r"head\.weight", "lm_head", LINEAR),
        (r"(features\.0\.0|features\.[13]\.0\.attn\.(qkv|proj)|features\.[13]\.0\.mlp\.[03]|head)\.bias", "bias", VEC)],
}
# Fused Q/K/V weights: (heads, rows of each of q, k, v), from each model's configuration above.
QKV = {
    "timm-vit": {"blocks.0.attn.qkv.weight": (3, 24), "blocks.1.attn.qkv.weight": (3, 24)},
    "timm-swin": {"layers.0.blocks.0.attn.qkv.weight": (2, 12), "layers.1.blocks.0.attn.qkv.weight": (4, 24)},
    "tv-vit": {f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight": (4, 32) for i in range(2)},
    "tv-swin": {"features.1.0.attn.qkv.weight": (2, 12), "features.3.0.attn.qkv.weight": (4, 24)},
}


def _vision_python() -> str | None:
    python = os.environ.get("LOWMEM_VISION_PYTHON") or str(ROOT / ".venv-vision" / "bin" / "python")
    return python if Path(python).exists() else None


@pytest.fixture(scope="module")
def report():
    python = _vision_python()
    if python is None:
        if os.environ.get("LOWMEM_REQUIRE_VISION") == "1":
            pytest.fail("LOWMEM_REQUIRE_VISION=1 but no Python with timm and torchvision: set LOWMEM_VISION_PYTHON "
                        "or make .venv-vision as .ci/run does")
        pytest.skip("no Python with timm and torchvision (LOWMEM_VISION_PYTHON, or .venv-vision as .ci/run makes "
                    "it): their wheels need a torch other than this CPU build")
    done = subprocess.run([python, str(ROOT / "tests" / "vision_models.py")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("model", list(EXPECTED))
def test_every_parameter_has_the_role_and_axes_its_library_gives_it(report, model):
    from expectations import check_every

    got = report["models"][model]
    check_every([(name, (i["role"], tuple(i["axes"]))) for name, i in got["layers"].items()], EXPECTED[model],
                f"{model}: ")
    assert sorted(got["unknown"]) == sorted(n for n, i in got["layers"].items() if i["role"] == "other")


@pytest.mark.parametrize("model", list(QKV))
def test_fused_qkv_parts_are_the_models_rows(report, model):
    got = report["models"][model]
    for name, (heads, size) in QKV[model].items():
        info = got["layers"][name]
        assert (info["heads"], info["parts"], info["part_groups"]) == (heads, [["q", size], ["k", size], ["v", size]],
                                                                      None), name
        # zeroing the rows lowmem calls `v` silenced the attention: no gradient reached its output
        # projection's weight (false if those rows were queries or keys: softmax of zeros is uniform)
        assert got["v_part_silences_attention"][name] is True, name
    assert set(got["v_part_silences_attention"]) == set(QKV[model])


@pytest.mark.parametrize("model", list(EXPECTED))
def test_memory_estimate_equals_the_live_state_of_every_optimizer(report, model):
    got = report["models"][model]
    memory = got["memory"]
    assert list(memory) == ["adamw", "slimadam", "eve", "adam-mini", "adam-mini-paper", "adalayer", "adamem",
                            "adafactor-momentum", "plan"]
    assert memory["adamw"] == [8 * got["parameters"]] * 2        # by hand: two fp32 entries per parameter
    for row, (estimate, live) in memory.items():
        assert estimate == live, f"{model}: {row}"


def test_the_other_python_is_the_pair_that_imports(report):
    assert report["versions"]["torchvision"].startswith("0.29") and report["versions"]["torch"].startswith("2.14")
