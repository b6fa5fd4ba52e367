"""Attention and FFN workers, and the multi-microbatch AFD pipeline.

The attention worker's decode loop is the same code colocated and split: it calls an
:class:`FFNExchange` with ``begin(layer, mb, u, routing)`` after a microbatch's
attention half and ``end(handle)`` when it needs the result. :class:`RemoteFFN` sends
through the :class:`~afdkit.runtime.connector.AfdConnector` to FFN workers;
:class:`LocalFFN` runs the same :class:`~afdkit.runtime.ffn.FFNShard` code in-process
(one shard per emulated FFN rank, partials reduced exactly as the channel does), which
makes the colocated model the bit-exact reference of the split one.

Pipeline (``k`` microbatches per attention worker, default 3)::

    for mb: attention(0, mb); begin(0, mb)
    for step, layer, mb:                       # in this order
        y = end(layer, mb); x[mb] = h[mb] + y  # the FFN of (layer, mb) ran meanwhile
        attention(layer + 1, mb); begin(layer + 1, mb)   # or: sample, next step's layer 0

While the FFN workers compute (layer, mb), the attention worker computes
(layer + 1, mb - 1) ... and the transfers of the others are in flight: with k = 3,
attention compute, FFN compute and transfers overlap. FFN workers serve (layer, mb)
in the same order: ``recv_attn_output -> FFN -> send_ffn_output``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from afdkit.models.step3 import Step3Config
from afdkit.runtime.checkpoint import TensorSource
from afdkit.runtime.connector import AfdConnector, AfdMetadata, AttnHandle
from afdkit.runtime.ffn import FFNShard, ShardSpec
from afdkit.runtime.kv import KVState, MicroBatch
from afdkit.runtime.layers import AttentionStack
from afdkit.runtime.numerics import Numerics, reduce_partials, wire_decode, wire_encode
from afdkit.runtime.timing import StageRecorder


def first_tokens(config: Step3Config, seq_ids: list[int], seed: int) -> torch.Tensor:
    """The token each sequence starts decoding from (seeded per global id)."""
    return torch.tensor([int(torch.randint(0, config.vocab_size, (1,),
                                           generator=torch.Generator().manual_seed(seed * 7919 + 13 * s + 1)))
                         for s in seq_ids], dtype=torch.long)


class FFNExchange(Protocol):
    def begin(self, layer: int, mb: int, u: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor] | None,
              home: torch.Tensor) -> Any: ...

    def end(self, handle: Any) -> torch.Tensor: ...


class RemoteFFN:
    """The FFN lives on FFN workers, reached through the connector."""

    stage = "send"  # what begin() spends its time on

    def __init__(self, connector: AfdConnector) -> None:
        self.connector = connector

    def begin(self, layer: int, mb: int, u: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor] | None,
              home: torch.Tensor) -> AttnHandle:
        w, ids = topk if topk is not None else (None, None)
        return self.connector.send_attn_output(u, AfdMetadata(layer, mb), topk_ids=ids, topk_weights=w, home=home)

    def end(self, handle: AttnHandle) -> torch.Tensor:
        return self.connector.recv_ffn_output(handle)


class LocalFFN:
    """The FFN in this process: one :class:`FFNShard` per emulated FFN rank, the wire
    formats and the channel's reduction applied exactly as in the split run."""

    stage = "ffn"

    def __init__(self, shards: list[FFNShard]) -> None:
        self.shards = shards

    def begin(self, layer: int, mb: int, u: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor] | None,
              home: torch.Tensor) -> torch.Tensor:
        n = u.shape[0]
        u_q, u_s = wire_encode(u)
        parts = []
        for f, shard in enumerate(self.shards):
            if topk is None or shard.spec.mode == "broadcast":
                rows = None
            else:
                owner = torch.as_tensor(shard.spec.expert_owner, device=u.device)
                mine = (owner[topk[1].long()] == f).any(dim=1) | (home == f)
                rows = mine.nonzero().flatten()
            sel = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
            u_rows = wire_decode(sel(u_q), sel(u_s), shard.numerics.compute_dtype)
            ids = None if topk is None else sel(topk[1])
            w = None if topk is None else sel(topk[0])
            y = shard.forward(layer, u_rows, ids, w, sel(home) == f) if u_rows.shape[0] else u_rows
            parts.append((rows, y.to(torch.bfloat16)))
        return reduce_partials(parts, n, u.shape[1], u.device)

    def end(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


@dataclass
class AttentionResult:
    seq_ids: list[int]
    tokens: torch.Tensor            # [n, steps] int64
    logits: torch.Tensor | None     # [n, steps, vocab] fp32 (when kept)


class AttentionWorker:
    """Owns the attention weights, the KV caches of its sequences, embedding, LM head
    and sampling; drives the pipeline through an :class:`FFNExchange`."""

    def __init__(self, config: Step3Config, source: TensorSource, numerics: Numerics, seq_ids: list[int],
                 *, context: int, steps: int, num_microbatches: int, num_ffn: int, seed: int = 0,
                 recorder: StageRecorder | None = None) -> None:
        self.config, self.numerics, self.seq_ids = config, numerics, list(seq_ids)
        self.steps, self.num_ffn, self.seed = steps, num_ffn, seed
        self.stack = AttentionStack(config, source, numerics)
        self.kv = KVState(config, config.num_hidden_layers, self.seq_ids, context + steps, numerics, num_microbatches)
        self.kv.fill_context(context, seed)
        self.recorder = recorder or StageRecorder(cuda=numerics.is_cuda)
        dev = numerics.device
        self._home = {mb.index: torch.tensor([s % num_ffn for s in mb.seq_ids], dtype=torch.long, device=dev)
                      for mb in self.kv.microbatches}

    @property
    def microbatches(self) -> list[MicroBatch]:
        return self.kv.microbatches

    def _begin(self, ffn: FFNExchange, layer: int, mb: MicroBatch, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        c, rec = self.config, self.recorder
        if mb.size == 0:
            empty = torch.zeros(0, c.hidden_size, dtype=self.numerics.compute_dtype, device=self.numerics.device)
            h, u, topk = empty, empty, None
            if c.is_moe_layer(layer):
                topk = (torch.zeros(0, c.moe_top_k, device=empty.device),
                        torch.zeros(0, c.moe_top_k, dtype=torch.int32, device=empty.device))
        else:
            with rec.span("attention", layer, mb.index):
                h, u = self.stack.attention(layer, x, self.kv, mb)
                topk = self.stack.route(layer, u) if c.is_moe_layer(layer) else None
        with rec.span(getattr(ffn, "stage", "send"), layer, mb.index):
            handle = ffn.begin(layer, mb.index, u, topk, self._home[mb.index])
        return h, handle

    def run(self, ffn: FFNExchange, on_step: Callable[[int], None] | None = None,
            keep_logits: bool = False) -> AttentionResult:
        """Decodes ``steps`` tokens per sequence (greedy); returns them by global id order."""
        c, rec, L = self.config, self.recorder, self.config.num_hidden_layers
        mbs = self.microbatches
        tok0 = first_tokens(c, self.seq_ids, self.seed).to(self.numerics.device)
        tokens = torch.zeros(len(self.seq_ids), self.steps, dtype=torch.long, device=self.numerics.device)
        logits_out = (torch.zeros(len(self.seq_ids), self.steps, c.vocab_size) if keep_logits else None)
        rec.start()
        state: dict[int, tuple[torch.Tensor, Any]] = {}
        for mb in mbs:
            self.kv.advance(mb)
            state[mb.index] = self._begin(ffn, 0, mb, self.stack.embed_tokens(tok0[mb.rows]))
        for step in range(self.steps):
            for layer in range(L):
                for mb in mbs:
                    h, handle = state.pop(mb.index)
                    with rec.span("wait", layer, mb.index):
                        y = ffn.end(handle)
                    x = h + y.to(h.dtype)
                    if layer + 1 < L:
                        state[mb.index] = self._begin(ffn, layer + 1, mb, x)
                        continue
                    if mb.size:
                        with rec.span("sample", layer, mb.index):
                            logits = self.stack.logits(x)
                            nxt = logits.argmax(dim=-1)
                        tokens[mb.rows, step] = nxt
                        if logits_out is not None:
                            logits_out[mb.rows, step] = logits.cpu()
                    else:
                        nxt = tokens[mb.rows, step]
                    if step + 1 < self.steps:
                        self.kv.advance(mb)
                        state[mb.index] = self._begin(ffn, 0, mb, self.stack.embed_tokens(nxt))
            rec.step_done()
            if on_step is not None:
                on_step(step)
        return AttentionResult(self.seq_ids, tokens.cpu(), logits_out)


class FFNWorker:
    """Owns this FFN rank's weights; serves ``recv -> FFN -> send back`` per (layer, mb)."""

    def __init__(self, config: Step3Config, source: TensorSource, numerics: Numerics, spec: ShardSpec,
                 *, steps: int, num_microbatches: int, recorder: StageRecorder | None = None) -> None:
        self.config, self.numerics = config, numerics
        self.steps, self.num_microbatches = steps, num_microbatches
        self.shard = FFNShard(config, source, spec, numerics)
        self.recorder = recorder or StageRecorder(cuda=numerics.is_cuda)

    def run(self, connector: AfdConnector, on_step: Callable[[int], None] | None = None) -> int:
        """Serves every (step, layer, microbatch); returns the number of rows served."""
        rec, c = self.recorder, self.config
        rows = 0
        rec.start()
        for step in range(self.steps):
            for layer in range(c.num_hidden_layers):
                moe_layer = c.is_moe_layer(layer)
                for mb in range(self.num_microbatches):
                    with rec.span("recv", layer, mb):
                        req = connector.recv_attn_output(layer, mb)
                    with rec.span("ffn", layer, mb):
                        u = req.hidden(self.numerics.compute_dtype)
                        if req.num_tokens == 0:
                            y = u
                        elif moe_layer:
                            y = self.shard.forward(layer, u, req.topk_ids, req.topk_weights, req.home)
                        else:
                            y = self.shard.forward(layer, u, None, None, None)
                    with rec.span("send_back", layer, mb):
                        connector.send_ffn_output(y, req)
                    rows += req.num_tokens
            rec.step_done()
            if on_step is not None:
                on_step(step)
        return rows


def colocated_shards(config: Step3Config, source: TensorSource, numerics: Numerics, mode: str, num_ffn: int,
                     expert_owner: tuple[int, ...] = ()) -> list[FFNShard]:
    """The FFN shards of ``num_ffn`` emulated FFN ranks, for :class:`LocalFFN`."""
    return [FFNShard(config, source, ShardSpec(mode, f, num_ffn, expert_owner), numerics) for f in range(num_ffn)]


__all__ = ["AttentionWorker", "FFNWorker", "FFNExchange", "RemoteFFN", "LocalFFN", "AttentionResult",
           "first_tokens", "colocated_shards"]
