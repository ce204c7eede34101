import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from shpeft.importance import estimate_importance
from shpeft.methods import PrepareContext, get_method
from shpeft.methods.lora import lora_parameters
from shpeft.methods.spt_lora import SptLoraConfig, plan_spt
from shpeft.sparse import sparse_state
from tests.helpers import tiny_batches, tiny_vit
from tests.methods.common import backbone_scalars, check_method

# tiny_vit (embed 16, depth 2, MLP 64): the ranked matrices and their (d_in, d_out)
SHAPES = {"attn.qkv": (16, 48), "attn.proj": (16, 16), "mlp.fc1": (16, 64), "mlp.fc2": (64, 16)}
MATRICES = {f"blocks.{b}.{m}.weight": s for b in range(2) for m, s in SHAPES.items()}

# (rank, SPT alpha, budget): each mixes LoRA matrices with sparse scalars on tiny_vit
MIXED = [(2, 2.0, 0.1), (4, 10.0, 0.1), (2, 10.0, 0.05)]


def _prepare(cfg: SptLoraConfig):
    model = tiny_vit()
    ctx = PrepareContext(importance_loader=lambda: tiny_batches(2), device="cpu")
    method = get_method("spt-lora")(cfg)
    trainable = method.prepare(model, ctx)
    return method, model, ctx, trainable


def brute_force(rank: int, alpha: float, budget_ratio: float):
    """Independent re-derivation: every tau, SPT's rule, the largest cost within budget."""
    model = tiny_vit()
    exclude = [n for n, _ in model.named_parameters() if n not in MATRICES]
    scores = estimate_importance(model, tiny_batches(2), strategy="td-l2", exclude=exclude)
    assert list(scores) == list(MATRICES)
    names = list(scores)
    cost = {n: rank * (d_in + d_out) for n, (d_in, d_out) in MATRICES.items()}
    entries = []  # (score, global index, matrix, flat index)
    for n in names:
        for i, s in enumerate(scores[n].reshape(-1).tolist()):
            entries.append((s, len(entries), n, i))
    entries.sort(key=lambda e: (-e[0], e[1]))  # descending, ties by lowest global index
    budget = round(budget_ratio * backbone_scalars(model))
    counts = dict.fromkeys(names, 0)
    best_k, best_cost = None, -1
    for k, (_, _, n, _) in enumerate(entries, start=1):
        counts[n] += 1
        c = sum(cost[m] if counts[m] >= cost[m] / alpha else counts[m] for m in names)
        if best_cost < c <= budget:
            best_k, best_cost = k, c
    top = entries[:best_k]
    selected = {n: sum(1 for e in top if e[2] == n) for n in names}
    lora = [n for n in names if selected[n] >= cost[n] / alpha]
    sparse = {n: sorted(e[3] for e in top if e[2] == n) for n in names if n not in lora}
    return best_k, best_cost, lora, {n: v for n, v in sparse.items() if v}, selected, cost


@pytest.mark.parametrize("rank, alpha, budget", MIXED)
def test_spt_lora_generic(tmp_path, rank, alpha, budget):
    cfg = SptLoraConfig(spt_budget=budget, spt_lora_rank=rank, spt_structured_alpha=alpha)
    _, _, lora, sparse, _, cost = brute_force(rank, alpha, budget)
    assert lora and sparse, "the case must mix LoRA matrices and sparse scalars"
    # hand count: r * (d_in + d_out) per LoRA matrix + the sparse scalars
    expected = sum(cost[n] for n in lora) + sum(len(v) for v in sparse.values())
    assert expected <= round(budget * backbone_scalars(tiny_vit()))
    _, _, delta = check_method(
        "spt-lora", cfg, expected_backbone=expected, tmp_path=tmp_path, atol=1e-6
    )
    assert delta.num_sparse == sum(len(v) for v in sparse.values()) > 0
    assert any(".lora_A." in n for n in delta.dense) and any(".lora_B." in n for n in delta.dense)
    # prepare recorded the LoRA modules in the config (the run's config.json) for build()
    assert cfg.spt_lora_modules == ",".join(n.removesuffix(".weight") for n in lora)


@pytest.mark.parametrize("rank, alpha, budget", [*MIXED, (1, 1.0, 0.05), (4, 2.0, 0.02)])
def test_spt_lora_chooses_what_brute_force_does(rank, alpha, budget):
    cfg = SptLoraConfig(spt_budget=budget, spt_lora_rank=rank, spt_structured_alpha=alpha)
    method, model, ctx, trainable = _prepare(cfg)
    k, total, lora, sparse, selected, cost = brute_force(rank, alpha, budget)

    plan = ctx.artifacts["selection"]
    assert plan["k"] == k and plan["trainable"] == total
    assert plan["selected"] == selected
    # LoRA exactly on the matrices whose selected count reaches the threshold r(d_in+d_out)/alpha
    assert plan["lora_modules"] == [n.removesuffix(".weight") for n in lora]
    for n, c in selected.items():
        assert (n in lora) == (c >= cost[n] / alpha)
    adapted = sorted({n.split(".lora_")[0] + ".weight" for n in lora_parameters(model)})
    assert adapted == sorted(lora)
    got = {n: i.tolist() for n, (i, _) in sparse_state(model).items()}
    assert got == sparse
    assert sum(p.numel() for p in trainable) - 51 == total  # 51: the head


def test_spt_lora_all_sparse_and_all_lora(tmp_path):
    # a small budget stays unstructured; a large one ends with every matrix on LoRA
    method, model, ctx, _ = _prepare(SptLoraConfig(spt_budget=0.02, spt_lora_rank=4))
    assert ctx.artifacts["selection"]["lora_modules"] == [] and method.config.spt_lora_modules == ""
    assert not lora_parameters(model)
    _, total, lora, sparse, _, _ = brute_force(4, 10.0, 0.02)
    assert lora == [] and sum(i.numel() for i, _ in sparse_state(model).values()) == total > 0
    check_method(
        "spt-lora",
        SptLoraConfig(spt_budget=0.4, spt_lora_rank=2),
        expected_backbone=sum(2 * (a + b) for a, b in MATRICES.values()),
        tmp_path=tmp_path,
        atol=1e-6,
    )


def test_plan_budget_too_small():
    scores = {"w": torch.tensor([[3.0, 2.0], [1.0, 0.0]])}
    with pytest.raises(ValueError, match="too small"):
        plan_spt(scores, {"w": 8}, budget=4, structured_alpha=10.0)
    plan = plan_spt(scores, {"w": 8}, budget=8, structured_alpha=10.0)
    assert plan.lora == ["w"] and plan.total == 8 and plan.k == 1


def test_plan_ties_follow_select_topk():
    # ties at the threshold go to the lowest global index, as in select_topk
    scores = {"a": torch.ones(2, 3), "b": torch.ones(3, 2)}
    plan = plan_spt(scores, {"a": 100, "b": 100}, budget=4, structured_alpha=1.0)
    assert plan.k == 4 and plan.lora == []
    assert {n: i.tolist() for n, i in plan.sparse.items()} == {"a": [0, 1, 2, 3]}


def test_spt_lora_preset_modules_must_match_the_data():
    cfg = SptLoraConfig(spt_budget=0.1, spt_lora_rank=2, spt_structured_alpha=2.0)
    _prepare(cfg)
    chosen = cfg.spt_lora_modules
    _prepare(dataclasses.replace(cfg))  # the saved config re-prepares to the same choice
    with pytest.raises(ValueError, match="spt_lora_modules"):
        _prepare(dataclasses.replace(cfg, spt_lora_modules="blocks.0.attn.qkv"))
    assert chosen


def test_spt_lora_resumes_from_saved_state(tmp_path):
    cfg = SptLoraConfig(spt_budget=0.1, spt_lora_rank=2, spt_structured_alpha=2.0)
    method, model, _, trainable = _prepare(cfg)
    path = tmp_path / "method_state.safetensors"
    save_file(method.state(model), str(path))  # as the training loop does (keys get sorted)

    fresh_cfg = dataclasses.replace(cfg, spt_lora_modules="")
    again = get_method("spt-lora")(fresh_cfg)
    model2 = tiny_vit()
    ctx = PrepareContext(saved_state=load_file(str(path)))  # no data: nothing re-estimated
    trainable2 = again.prepare(model2, ctx)
    assert fresh_cfg.spt_lora_modules == cfg.spt_lora_modules != ""
    assert [p.shape for p in trainable2] == [p.shape for p in trainable]
    names = {id(p): n for n, p in model.named_parameters()}
    names2 = {id(p): n for n, p in model2.named_parameters()}
    assert [names2[id(p)] for p in trainable2] == [names[id(p)] for p in trainable]
    for (n, (i, _)), (n2, (i2, _)) in zip(
        sparse_state(model).items(), sparse_state(model2).items(), strict=True
    ):
        assert n == n2 and torch.equal(i, i2)


def test_spt_lora_needs_data():
    with pytest.raises(ValueError, match="training data"):
        get_method("spt-lora")().prepare(tiny_vit(), PrepareContext())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spt_budget": 0}, "spt_budget"),
        ({"spt_budget": 1.5}, "spt_budget"),
        ({"spt_lora_rank": 0}, "spt_lora_rank"),
        ({"spt_lora_alpha": -1}, "spt_lora_alpha"),
        ({"spt_structured_alpha": 0}, "spt_structured_alpha"),
        ({"spt_batches": 0}, "spt_batches"),
    ],
)
def test_spt_lora_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SptLoraConfig(**kwargs)
