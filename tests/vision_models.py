"""Run by tests/test_vision_models.py in a Python that has timm and torchvision (their wheels need a
torch other than the CPU build the suite runs on; `.ci/run` makes that Python): builds small
timm and torchvision models from their own classes (random init, no download), and prints as JSON
what lowmem reads each parameter as, the facts the test checks by gradient, and each memory
row's estimate beside the bytes of the real state after one real training step.

    python tests/vision_models.py > out.json
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from lowmem.compress import slimadam_rules
from lowmem.compress.memory import estimate_state_memory, optimizer_state_bytes
from lowmem.layers import resolve_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_rows import OPTIMIZERS  # noqa: E402  (the rows tests/compress/test_memory.py checks)

IMAGE = 32


def models() -> dict[str, nn.Module]:
    from timm.models.convnext import ConvNeXt as TimmConvNeXt
    from timm.models.swin_transformer import SwinTransformer as TimmSwin
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer
    return {
        "timm-vit": TimmViT(img_size=IMAGE, patch_size=8, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2,
                            num_classes=10),
        "timm-convnext": TimmConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10),
        "timm-convnext-conv-mlp": TimmConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, conv_mlp=True),
        "timm-swin": TimmSwin(img_size=IMAGE, patch_size=2, window_size=4, embed_dim=12, depths=(1, 1),
                              num_heads=(2, 4), num_classes=10),
        "timm-efficientnet": timm.create_model("efficientnet_b0", pretrained=False, num_classes=10),
        "tv-resnet": ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10),
        "tv-vit": VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                    mlp_dim=64, num_classes=10),
        "tv-convnext": ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10),
        "tv-swin": SwinTransformer(patch_size=[2, 2], embed_dim=12, depths=[1, 1], num_heads=[2, 4],
                                   window_size=[4, 4], num_classes=10),
    }


def _loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=gen)
    return nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))


def _qkv_parts(model: nn.Module, layers) -> dict[str, bool]:
    """Per fused Q/K/V weight: whether zeroing the rows lowmem calls its `v` part (and their bias)
    makes the attention's output zero, so that no gradient reaches the output projection: true
    only where those rows are the model's values."""
    out = {}
    for info in layers:
        if info.role != "attn_qkv" or info.is_bias or not info.parts or info.part_groups:
            continue
        owner_path, _, attr = info.name.rpartition(".")
        owner = model.get_submodule(owner_path)
        start = sum(size for part, size in info.parts[:[p for p, _ in info.parts].index("v")])
        stop = start + dict(info.parts)["v"]
        with torch.no_grad():
            getattr(owner, attr)[start:stop].zero_()
            bias = getattr(owner, "in_proj_bias" if attr == "in_proj_weight" else "bias", None)
            if bias is not None:
                bias[start:stop].zero_()
        # the output projection: nn.MultiheadAttention's own, else the `proj` beside the qkv Linear
        attn = owner if isinstance(owner, nn.MultiheadAttention) else model.get_submodule(owner_path.rpartition(".")[0])
        out[info.name] = attn.out_proj if isinstance(owner, nn.MultiheadAttention) else attn.proj
    model.zero_grad()
    _loss(model, torch.Generator().manual_seed(0)).backward()
    return {name: bool(proj.weight.grad.abs().max() == 0) for name, proj in out.items()}


def main() -> None:
    report = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                           "timm": timm.__version__}, "models": {}}
    for key, model in models().items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers = resolve_layers(model)
        params = list(model.parameters())
        plan = slimadam_rules(model)
        estimate = estimate_state_memory(model, plan)
        memory = {}
        gen = torch.Generator().manual_seed(1)
        for row in estimate.rows:
            optimizer = OPTIMIZERS[row.name](model, plan)
            model.zero_grad()
            _loss(model, gen).backward()
            optimizer.step()
            memory[row.name] = [row.total_bytes, optimizer_state_bytes(optimizer).without_step]
        report["models"][key] = {
            "parameters": sum(p.numel() for p in params),
            "layers": {i.name: {"role": i.role, "axes": list(i.axes), "shape": list(i.shape), "heads": i.heads,
                                "parts": None if i.parts is None else [list(p) for p in i.parts],
                                "part_groups": i.part_groups, "found": i.found} for i in layers},
            "unknown": list(layers.unknown),
            "memory": memory,
            "v_part_silences_attention": _qkv_parts(model, layers),
        }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
