"""The KV cache of an attention worker: paged FP8 K/V per layer for its sequences.

Sequences keep their global ids (their index in the whole batch) so that a cache
filled for sequence 5 holds the same values whether sequence 5 lives on attention
rank 0, rank 1 or in the colocated model: ``fill_context`` draws each sequence's
synthetic context from a generator seeded by (seed, layer, global id).

A :class:`MicroBatch` is a contiguous slice of the worker's sequences with its own
``seq_lens``, slot mapping and (CUDA) split-KV ``DecodePlan``, refreshed once per step
and shared by all layers of that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afdkit import mfa
from afdkit.models.step3 import Step3Config
from afdkit.runtime.numerics import Numerics


@dataclass
class LayerCache:
    k: torch.Tensor        # [num_pages, page_size, 1, 256] fp8
    v: torch.Tensor
    k_scale: torch.Tensor  # [num_pages, page_size, 1] fp32 per-token scales
    v_scale: torch.Tensor


@dataclass
class MicroBatch:
    index: int
    rows: slice                      # rows of the worker's sequences
    seq_ids: list[int]               # global ids
    block_table: torch.Tensor        # [n, pages_per_seq] int32 (a view)
    seq_lens: torch.Tensor           # [n] int32, tokens cached after this step's append
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    plan: mfa.DecodePlan | None = None

    @property
    def size(self) -> int:
        return len(self.seq_ids)


def split_rows(n: int, parts: int) -> list[slice]:
    """``n`` rows into ``parts`` contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


class KVState:
    """Paged caches of ``len(seq_ids)`` sequences for ``layers`` layers."""

    def __init__(self, config: Step3Config, num_layers: int, seq_ids: list[int], max_tokens: int,
                 numerics: Numerics, num_microbatches: int) -> None:
        if config.num_kv_heads != 1 or config.head_dim != mfa.HEAD_DIM:
            raise ValueError("afdkit.runtime: the MFA kernels need one K/V head of dim 256")
        self.config, self.numerics = config, numerics
        self.seq_ids = list(seq_ids)
        n = len(self.seq_ids)
        page = numerics.page_size
        self.pages_per_seq = max(1, -(-max_tokens // page))
        self.max_tokens = self.pages_per_seq * page
        num_pages = n * self.pages_per_seq + 1  # one page nobody uses: stays NaN
        dev = numerics.device
        shape = (num_pages, page, 1, config.head_dim)

        def poisoned(s: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.full(s, float("nan"), device=dev).to(dtype)

        self.layers = [LayerCache(poisoned(shape, torch.float8_e4m3fn), poisoned(shape, torch.float8_e4m3fn),
                                  poisoned(shape[:3], torch.float32), poisoned(shape[:3], torch.float32))
                       for _ in range(num_layers)]
        # A fixed scatter of pages: decode must follow the block table, not assume order.
        perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(n))[: n * self.pages_per_seq]
        self.block_table = perm.view(n, self.pages_per_seq).to(device=dev, dtype=torch.int32)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.microbatches = [
            MicroBatch(i, rows, self.seq_ids[rows], self.block_table[rows], self.seq_lens[rows].clone())
            for i, rows in enumerate(split_rows(n, num_microbatches))]

    def fill_context(self, context: int, seed: int) -> None:
        """Writes ``context`` synthetic tokens of K/V per sequence and layer (N(0, 1)
        values through ``mfa.append_kv``), seeded per (seed, layer, global sequence id).

        The values are drawn on the host while the whole context is small (under 2^26
        values: tests then see the same cache on CPU and GPU) and on the device beyond
        (a 4K context for hundreds of sequences would take minutes on the host)."""
        if context < 0 or context >= self.max_tokens:
            raise ValueError(f"afdkit.runtime: context {context} does not fit the cache ({self.max_tokens} tokens)")
        if context:
            dev = self.numerics.device
            hd, page = self.config.head_dim, self.numerics.page_size
            total = 2 * context * hd * len(self.seq_ids) * len(self.layers)
            draw = torch.device("cpu") if total < (1 << 26) else dev
            pos = torch.arange(context, device=dev)
            for li, cache in enumerate(self.layers):
                for row, sid in enumerate(self.seq_ids):
                    gen = torch.Generator(device=draw).manual_seed((seed * 1_000_003 + li) * 65_537 + sid)
                    kv = torch.randn(2, context, 1, hd, generator=gen, device=draw).to(device=dev, dtype=torch.bfloat16)
                    slots = self.block_table[row, pos // page].long() * page + pos % page
                    mfa.append_kv(kv[0], kv[1], cache.k, cache.v, slots, cache.k_scale, cache.v_scale)
        self.seq_lens.fill_(context)
        for mb in self.microbatches:
            mb.seq_lens.fill_(context)

    def advance(self, mb: MicroBatch) -> None:
        """Makes room for one new token per sequence of ``mb``: seq_lens + 1, the new
        token's position and cache slot, and the split-KV plan of this step."""
        if mb.size == 0:
            return
        page = self.numerics.page_size
        mb.seq_lens += 1
        self.seq_lens[mb.rows] = mb.seq_lens
        mb.positions = (mb.seq_lens - 1).long()
        if self.numerics.check_indices and int(mb.seq_lens.max()) > self.max_tokens:
            raise ValueError(f"afdkit.runtime: sequences outgrew the KV cache ({self.max_tokens} tokens)")
        page_idx = (mb.positions // page).unsqueeze(1)
        mb.slots = (torch.gather(mb.block_table.long(), 1, page_idx).squeeze(1) * page + mb.positions % page)
        if self.numerics.is_cuda:
            if mb.plan is None:
                q = torch.empty(mb.size, 1, self.config.num_attention_heads, self.config.head_dim,
                                dtype=torch.bfloat16, device=self.numerics.device)
                mb.plan = mfa.DecodePlan.create(q, self.layers[0].k)
            mb.plan.update(mb.seq_lens)


__all__ = ["KVState", "MicroBatch", "LayerCache", "split_rows"]
