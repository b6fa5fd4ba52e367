"""Types shared by every expert-parallel dispatcher backend (mesh, CUDA IPC).

The contract, for ``R`` ranks, ``E`` experts (``E % R == 0``, rank ``r`` owns experts
``[r * E/R, (r + 1) * E/R)``), ``T <= max_tokens_per_rank`` tokens on the calling rank and
top-k ``k``:

``dispatch(x [T, hidden] bf16, topk_ids [T, k] int, topk_weights [T, k] fp32)`` returns a
:class:`DispatchOutput` on every rank: the rows of all ranks' tokens that chose one of
this rank's experts, expert-major (one row per (token, local expert) pair), with
``offsets[e]..offsets[e+1]`` the rows of local expert ``e``. Within one expert rows are
ordered by (source rank, source token index), so results are deterministic. Rows past
``offsets[-1]`` are unused (fixed-size buffers keep the call graph-capturable).

``combine(expert_out [capacity, hidden] bf16 in the row order of dispatch, handle)``
returns ``[T, hidden]`` bf16 on the rank that dispatched: ``sum_k topk_weights[t, k] *
expert_out[row of (t, k)]``, accumulated in fp32 and rounded to bf16 once. Each rank
reduces its own experts' weighted rows per token before sending back, so a token costs
one row per destination rank in each direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchOutput:
    """What a rank receives from dispatch: its local experts' rows, expert-major."""

    tokens: torch.Tensor              # [capacity, hidden] fp8 e4m3 (quant="fp8") or bf16
    scales: torch.Tensor | None       # [capacity, hidden // 128] fp32 when fp8, else None
    counts: torch.Tensor              # [num_local_experts] int32, on the tokens' device
    offsets: torch.Tensor             # [num_local_experts + 1] int32, offsets[0] == 0
    handle: Any                       # backend state for combine (source rank/index per row, weights)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]


__all__ = ["DispatchOutput"]
