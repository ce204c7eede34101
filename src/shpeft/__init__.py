"""shpeft: sparsity- and hybridity-inspired parameter-efficient fine-tuning (SH-PEFT) of ViTs.

Liu, Xu, Liu, Zhang (2024): train only the top-k% backbone scalars ranked by
``I = I_td + lambda * s * I_ta`` (gradient-based task-dependent importance plus magnitude-based
task-agnostic importance), and ship each task as a small sparse delta on a shared backbone.
"""

__version__ = "0.1.0"

from shpeft.importance import estimate_importance  # noqa: E402
from shpeft.selection import select_topk  # noqa: E402

__all__ = ["__version__", "estimate_importance", "select_topk"]
