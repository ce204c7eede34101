"""Delta file size of SH-PEFT against the 8 bytes x k + head bound, for four ViT sizes.

Usage: python benchmarks/delta_size.py   (CPU, ~1 minute; needs ../shared/models for two sizes)
"""

import tempfile
from pathlib import Path

import torch

from shpeft.backbones import BackboneConfig, create_model
from shpeft.methods import PrepareContext, get_method
from shpeft.methods.shpeft import ShpeftConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
torch.manual_seed(0)
sizes = {
    "vit_pico": BackboneConfig(model=str(SHARED / "vit_pico")),
    "vit_mini": BackboneConfig(model=str(SHARED / "vit_mini")),
    "vit_tiny": BackboneConfig(model="vit_tiny_patch16_224", pretrained=False),
    "vit_base": BackboneConfig(model="vit_base_patch16_224", pretrained=False),
}
print("| model | ratio | k | touched tensors | delta file | 8k + head | overhead |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, cfg in sizes.items():
    for ratio in (0.01, 0.0001):
        model, spec = create_model(cfg, num_classes=3)
        s = spec.image_size
        batches = [(torch.randn(4, 3, s, s), torch.randint(0, 3, (4,))) for _ in range(2)]
        m = get_method("shpeft")(ShpeftConfig(ratio=ratio))
        m.prepare(model, PrepareContext(importance_loader=lambda b=batches: b))
        d = m.delta(model)
        d.meta.update(m.meta())
        with tempfile.TemporaryDirectory() as t:
            size = d.save(Path(t) / "d.safetensors").stat().st_size
        bound = 8 * d.num_sparse + 4 * d.num_dense
        print(
            f"| {name} | {ratio:g} | {d.num_sparse:,} | {len(d.sparse)} | {size:,} B | {bound:,} B | {size - bound:,} B |",
            flush=True,
        )
