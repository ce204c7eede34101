import peft
import pytest
import torch
import torch.nn.functional as F

from shpeft.methods import PrepareContext, get_method
from shpeft.methods.lora import LoraMethodConfig, lora_parameters
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import check_method

D, DEPTH, HIDDEN = 16, 2, 64  # tiny_vit: embed 16, depth 2, MLP ratio 4


def lora_count(r: int, targets=("qkv", "proj")) -> int:
    """r * (d_in + d_out) per adapted matrix, by hand."""
    shapes = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, HIDDEN), "fc2": (HIDDEN, D)}
    return DEPTH * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


@pytest.mark.parametrize("rank", [2, 4])
def test_lora_generic(tmp_path, rank):
    # per block: qkv r*(D + 3D) + proj r*(D + D); r=2 -> 2 * (128 + 64) = 384
    expected = DEPTH * (rank * (D + 3 * D) + rank * (D + D))
    assert expected == lora_count(rank)
    check_method(
        "lora",
        LoraMethodConfig(lora_rank=rank, lora_alpha=2.0 * rank),
        expected_backbone=expected,
        tmp_path=tmp_path,
        atol=1e-6,
    )


def test_lora_all_linear_targets_with_dropout(tmp_path):
    targets = ("qkv", "proj", "fc1", "fc2")
    check_method(
        "lora",
        LoraMethodConfig(lora_rank=3, lora_dropout=0.1, lora_targets=",".join(targets)),
        expected_backbone=lora_count(3, targets),
        tmp_path=tmp_path,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_rank": 2.5}, "lora_rank"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_targets": "qkv,fc3"}, "lora_targets"),
        ({"lora_targets": ""}, "lora_targets"),
    ],
)
def test_lora_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraMethodConfig(**kwargs)


def test_lora_only_targets_attention_projections():
    model = tiny_vit()
    get_method("lora")().prepare(model, PrepareContext())
    adapted = sorted({n.split(".lora_")[0] for n in lora_parameters(model)})
    assert adapted == [f"blocks.{i}.attn.{m}" for i in range(DEPTH) for m in ("proj", "qkv")]


def test_lora_agrees_with_peft_get_peft_model():
    """Same LoRA weights in our injected timm model and in peft's own PeftModel: same logits,
    and our merge equals peft's merge_and_unload."""
    rank, alpha = 4, 6.0
    cfg = LoraMethodConfig(lora_rank=rank, lora_alpha=alpha)
    method = get_method("lora")(cfg)
    ours = tiny_vit()
    params = method.prepare(ours, PrepareContext())
    # train a little so that B (zero at init) and the head are non-trivial
    opt = torch.optim.SGD(params, lr=0.5)
    for x, y in tiny_batches(3, seed=3):
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
    assert all(p.abs().sum() > 0 for n, p in lora_parameters(ours).items() if "lora_B" in n)

    ref = peft.get_peft_model(
        tiny_vit(),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=r"blocks\.\d+\.attn\.(qkv|proj)"),
    )
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        trained = lora_parameters(ours) | {n: p for n, p in ours.named_parameters() if "head" in n}
        for n, p in trained.items():
            ref_params[f"base_model.model.{n}"].copy_(p)
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == sum(
        p.numel() for p in lora_parameters(ours).values()
    )

    x, _ = tiny_batches(1, seed=7)[0]
    ours.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)

    merged_ours = method.merge(ours)
    merged_ref = ref.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged_ours.modules())
    assert not hasattr(merged_ours, "peft_config")
    ref_state = merged_ref.state_dict()
    assert set(merged_ours.state_dict()) == set(ref_state) == set(tiny_vit().state_dict())
    for n, t in merged_ours.state_dict().items():
        torch.testing.assert_close(t, ref_state[n], rtol=0, atol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(x), merged_ref(x), rtol=0, atol=0)
