"""The SH-PEFT paper's published numbers, transcribed for side-by-side reporting.

Source: Liu, Xu, Liu, Zhang (2024), "Sparsity- and Hybridity-Inspired Visual Parameter-Efficient
Fine-Tuning for Medical Diagnosis": Table 1 (macro F1 %, CLIP ViT-B/16, six datasets), Table 4
(importance strategies) and Table 5 (lambda), as transcribed in ``../shared/paper/METHOD.md`` and
checked against the paper's text (``../shared/paper/sh-peft-paper.txt``). Table 5's ACC column is
only in the paper's text (METHOD.md lists its F1 column). The paper's ACC and AUC for Table 1 are
in its supplementary material, which is not available here, so none are transcribed.
"""

from __future__ import annotations

PAPER = "Liu, Xu, Liu, Zhang (2024), SH-PEFT"
PAPER_SOURCE = (
    "../shared/paper/METHOD.md (Table 1, ablations) and sh-peft-paper.txt (Tables 1, 4, 5)"
)

PAPER_PROTOCOL = {
    "backbone": "CLIP ViT-B/16 (vit_base_patch16_clip_224.openai)",
    "image_size": 224,
    "iterations": 40000,
    "batch_size": 64,
    "optimizer": "SGD momentum 0.9",
    "lr": 1e-3,
    "schedule": "cosine",
    "lr_search": "none: one shared setting for every method",
    "shpeft": "L2 importance, lambda 1.0, 1% of the scalars",
}

#: The paper's six datasets, in its column order (D1..D6).
PAPER_DATASETS: tuple[str, ...] = ("Chaoyang", "COVID-CT", "BUSI", "CXR3", "OCT", "LIMUC")

#: The paper's Table 1 rows (shpeft method names, whose ``MethodInfo.label`` is the paper's
#: row label), in the paper's row order.
PAPER_METHOD_ORDER: tuple[str, ...] = (
    "full",
    "linear",
    "adapter",
    "ssf",
    "lora",
    "vpt-deep",
    "vpt-shallow",
    "ln",
    "bitfit",
    "attn",
    "spt-lora",
    "shpeft",
)

#: Table 1: macro F1 (%) per dataset (PAPER_DATASETS order), then the paper's average.
PAPER_TABLE1_F1: dict[str, tuple[float, ...]] = {
    "full": (80.2, 73.5, 82.5, 76.3, 94.2, 69.1, 79.3),
    "linear": (68.3, 76.4, 76.0, 79.6, 81.9, 60.4, 73.8),
    "adapter": (75.5, 78.6, 84.1, 77.7, 93.2, 67.4, 79.4),
    "ssf": (78.8, 79.5, 89.8, 78.5, 92.2, 71.9, 81.8),
    "lora": (81.9, 82.4, 87.8, 78.0, 96.3, 67.9, 82.4),
    "vpt-deep": (70.4, 78.2, 75.1, 78.0, 82.3, 64.2, 74.7),
    "vpt-shallow": (74.2, 78.8, 81.6, 80.3, 90.0, 69.3, 79.0),
    "ln": (74.2, 75.5, 79.6, 76.4, 87.2, 68.1, 76.8),
    "bitfit": (79.1, 80.0, 86.1, 73.6, 93.3, 72.2, 80.7),
    "attn": (81.1, 81.6, 88.8, 79.4, 95.8, 70.1, 82.8),
    "spt-lora": (81.8, 80.2, 90.2, 77.3, 96.0, 69.5, 82.9),
    "shpeft": (80.6, 83.0, 90.5, 81.0, 95.6, 72.7, 83.9),
}

#: Table 4: importance strategy (shpeft ``--strategy``) -> (avg F1 %, avg ACC %) over six datasets.
#: Rows in the paper's order: I_ta only, I_td L1, hybrid L1, I_td L2, hybrid L2 (lambda 1).
PAPER_TABLE4: dict[str, tuple[float, float]] = {
    "ta": (81.9, 84.5),
    "td-l1": (81.3, 84.3),
    "l1": (82.4, 85.0),
    "td-l2": (82.0, 84.7),
    "l2": (83.9, 86.3),
}
PAPER_TABLE4_LABELS: dict[str, str] = {
    "ta": "task-agnostic only (magnitude)",
    "td-l1": "task-dependent L1",
    "l1": "hybrid L1",
    "td-l2": "task-dependent L2",
    "l2": "hybrid L2 (SH-PEFT)",
}

#: Table 5: lambda (L2 strategy) -> (avg F1 %, avg ACC %) over six datasets, the paper's row order.
PAPER_TABLE5: dict[float, tuple[float, float]] = {
    1.5: (82.4, 85.1),
    1.2: (83.1, 85.6),
    1.0: (83.9, 86.3),
    0.8: (82.6, 85.1),
    0.5: (82.5, 85.1),
}

#: Fig. 2 (left), in words: "keeping around 10% of the changes could maintain around 95% of the
#: full fine-tune performance". The figure's values are not given in the text.
PAPER_SPARSITY_CLAIM = {"k_percent": 10.0, "share_of_full_ft": 0.95}
PAPER_SPARSITY_KS: tuple[float, ...] = (100, 50, 20, 10, 5, 1, 0.1)
PAPER_HYBRIDITY_KS: tuple[float, ...] = (5, 1, 0.1, 0.05)


def paper_f1(method: str, dataset: str | None) -> float | None:
    """The paper's Table 1 macro F1 (%) of ``method`` on a paper dataset (None: the average)."""
    row = PAPER_TABLE1_F1.get(method)
    if row is None:
        return None
    if dataset is None:
        return row[-1]
    if dataset not in PAPER_DATASETS:
        return None
    return row[PAPER_DATASETS.index(dataset)]
