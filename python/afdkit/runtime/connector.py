"""The embedding API: an AFD connector with the four calls serving engines use.

Attention side::

    handle = conn.send_attn_output(u, AfdMetadata(layer_idx, stage_idx), topk_ids=ids, topk_weights=w)
    y = conn.recv_ffn_output(handle)          # bf16 [T, H]: the FFN ranks' partials, added

FFN side::

    req = conn.recv_attn_output(layer_idx, stage_idx)   # rows of every attention rank
    conn.send_ffn_output(my_ffn(req.hidden(torch.bfloat16), req), req)

(the same four operations as vLLM's AFD connector plugin: ``send_attn_output``,
``recv_ffn_output``, ``recv_attn_output``, ``send_ffn_output``). Underneath is one
:class:`afdkit.mesh.AfdChannel`; only its public calls are used. The wire format is
AFD's: ``u`` as FP8 e4m3 with one fp32 scale per 128 channels, the top-k ids (int32)
and weights (fp32), and each row's *home* FFN rank (who applies the shared expert in
routed mode); results come back as bf16 and are summed in fp32 (rounded once).

Ordering: on CUDA every call runs on the caller's current stream. ``send_attn_output``
quantizes and packs on that stream and the channel posts the put after it (no extra
synchronisation of the producer); ``recv_*`` return tensors whose copies are queued on
the current stream. Calls must be made in the same (layer, stage) order on every rank;
up to ``num_stages`` stages (microbatches) may be in flight per layer. The calls block
the host at the two points where the row counts must be known (the routing mask on
send, the message header on receive), so they are the graph boundaries of a
piecewise-captured decode step: the compute between them can be captured in CUDA
graphs with fixed-size buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afdkit.mesh import AfdChannel, ChannelConfig, Mesh, TensorSpec
from afdkit.runtime.numerics import WIRE_GROUP, wire_decode, wire_encode


@dataclass
class ConnectorConfig:
    hidden_size: int
    top_k: int
    max_tokens: int                       # rows one attention rank sends per stage, at most
    num_stages: int = 3                   # microbatches in flight per layer
    mode: str = "broadcast"               # "broadcast" (TP FFN) or "routed" (EP FFN)
    expert_owner: tuple[int, ...] | None = None  # routed: expert id -> FFN index
    device: str = "cpu"
    name: str = "afd"
    timeout_s: float | None = None        # default: the mesh's
    num_layers: int | None = None         # when set, layer ids are range-checked
    stream_ordered: bool = False          # CUDA, peers over ipc: the stream-ordered channel protocol

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.hidden_size % WIRE_GROUP:
            raise ValueError(f"afdkit.runtime.ConnectorConfig: hidden_size must be a positive multiple of "
                             f"{WIRE_GROUP}, got {self.hidden_size}")
        if self.top_k < 1:
            raise ValueError(f"afdkit.runtime.ConnectorConfig: top_k must be >= 1, got {self.top_k}")
        if self.mode == "routed" and not self.expert_owner:
            raise ValueError("afdkit.runtime.ConnectorConfig: routed mode needs expert_owner")

    def channel_config(self) -> ChannelConfig:
        h, k = self.hidden_size, self.top_k
        send = (TensorSpec("u", (h,), torch.float8_e4m3fn), TensorSpec("u_scale", (h // WIRE_GROUP,), torch.float32),
                TensorSpec("topk_ids", (k,), torch.int32), TensorSpec("topk_weights", (k,), torch.float32),
                TensorSpec("home", (1,), torch.int32))
        recv = (TensorSpec("y", (h,), torch.bfloat16),)
        return ChannelConfig(max_tokens=self.max_tokens, send=send, recv=recv, mode=self.mode,
                             num_microbatches=self.num_stages, name=self.name, device=self.device,
                             timeout_s=self.timeout_s, num_layers=self.num_layers,
                             stream_ordered=self.stream_ordered)


@dataclass(frozen=True)
class AfdMetadata:
    """Which exchange a call belongs to: the layer and the stage (microbatch)."""

    layer_idx: int
    stage_idx: int


@dataclass(frozen=True)
class AttnHandle:
    """What ``send_attn_output`` returns; ``recv_ffn_output`` takes it back."""

    metadata: AfdMetadata
    num_tokens: int


@dataclass
class FFNRequest:
    """The rows an FFN rank received for one (layer, stage), all attention ranks'
    rows concatenated in attention-rank order."""

    metadata: AfdMetadata
    hidden_fp8: torch.Tensor      # [R, H] e4m3
    hidden_scale: torch.Tensor    # [R, H / 128] fp32
    topk_ids: torch.Tensor        # [R, k] int32 (zeros for dense layers)
    topk_weights: torch.Tensor    # [R, k] fp32
    home: torch.Tensor            # [R] bool: this FFN rank applies the row's shared expert
    counts: list[int]             # rows from each attention rank

    @property
    def num_tokens(self) -> int:
        return self.hidden_fp8.shape[0]

    def hidden(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The received ``u`` dequantized (fp32 math, then ``dtype``)."""
        return wire_decode(self.hidden_fp8, self.hidden_scale, dtype)


class AfdConnector:
    """One rank's AFD connector over a connected :class:`~afdkit.mesh.Mesh`.
    Collective to construct (every rank of the mesh, same config)."""

    def __init__(self, mesh: Mesh, config: ConnectorConfig) -> None:
        self.mesh, self.config = mesh, config
        self.channel = AfdChannel(mesh, config.channel_config())
        self.num_ffn = len(self.channel.ffn)
        self.is_attention = self.channel.is_attention
        self.ffn_index = None if self.is_attention else self.channel.ffn.index(mesh.rank)
        owner = config.expert_owner
        if config.mode == "routed":
            assert owner is not None
            bad = [o for o in owner if not 0 <= o < self.num_ffn]
            if bad:
                raise ValueError(f"afdkit.runtime.AfdConnector: expert_owner names FFN indices {sorted(set(bad))} "
                                 f"outside [0, {self.num_ffn})")
        self._owner = None if owner is None else torch.tensor(owner, dtype=torch.long)

    # ---- attention side -------------------------------------------------------------------

    def _routing_mask(self, n: int, topk_ids: torch.Tensor | None, home: torch.Tensor) -> torch.Tensor | None:
        if self.config.mode == "broadcast":
            return None
        if topk_ids is None:  # dense layer: tensor-parallel FFN, every rank gets every row
            return torch.ones(n, self.num_ffn, dtype=torch.bool)
        assert self._owner is not None
        ids = topk_ids.to("cpu", torch.long)
        if n and (int(ids.min()) < 0 or int(ids.max()) >= len(self._owner)):
            raise ValueError(f"afdkit.runtime.send_attn_output: topk_ids must lie in [0, {len(self._owner)})")
        mask = torch.zeros(n, self.num_ffn, dtype=torch.bool)
        mask.scatter_(1, self._owner[ids], True)
        mask[torch.arange(n), home.to("cpu", torch.long)] = True
        return mask

    def send_attn_output(self, hidden_states: torch.Tensor, metadata: AfdMetadata, *,
                         topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                         home: torch.Tensor | None = None) -> AttnHandle:
        """Sends ``hidden_states [T, H]`` (the post-attention normed state ``u``) of one
        (layer, stage) to the FFN ranks, with its routing for MoE layers.

        ``topk_ids [T, k]`` / ``topk_weights [T, k]``: None for a dense layer. ``home [T]``
        (int): the FFN index that applies each row's shared expert in routed mode
        (default: row index mod the number of FFN ranks).
        """
        if not self.is_attention:
            raise RuntimeError("afdkit.runtime.send_attn_output: this is an FFN rank (use send_ffn_output)")
        c = self.config
        if hidden_states.dim() != 2 or hidden_states.shape[1] != c.hidden_size:
            raise ValueError(f"afdkit.runtime.send_attn_output: hidden_states must be [T, {c.hidden_size}], "
                             f"got {list(hidden_states.shape)}")
        n, dev = hidden_states.shape[0], hidden_states.device
        if (topk_ids is None) != (topk_weights is None):
            raise ValueError("afdkit.runtime.send_attn_output: give both topk_ids and topk_weights, or neither")
        if topk_ids is not None and (tuple(topk_ids.shape) != (n, c.top_k) or topk_weights.shape != topk_ids.shape):
            raise ValueError(f"afdkit.runtime.send_attn_output: topk_ids/topk_weights must be [{n}, {c.top_k}], got "
                             f"{list(topk_ids.shape)} / {list(topk_weights.shape)}")
        if home is None:
            home = torch.arange(n, device=dev) % self.num_ffn
        elif home.shape != (n,):
            raise ValueError(f"afdkit.runtime.send_attn_output: home must be [{n}], got {list(home.shape)}")
        u_q, u_s = wire_encode(hidden_states)
        ids = torch.zeros(n, c.top_k, dtype=torch.int32, device=dev) if topk_ids is None else topk_ids.to(torch.int32)
        w = (torch.zeros(n, c.top_k, dtype=torch.float32, device=dev) if topk_weights is None
             else topk_weights.to(torch.float32))
        mask = self._routing_mask(n, topk_ids, home)
        self.channel.send(metadata.layer_idx, metadata.stage_idx,
                          (u_q, u_s.contiguous(), ids.contiguous(), w.contiguous(),
                           home.to(device=dev, dtype=torch.int32).view(n, 1)), routing=mask)
        return AttnHandle(metadata, n)

    def recv_ffn_output(self, handle: AttnHandle) -> torch.Tensor:
        """The FFN result for the rows of ``handle``: bf16 ``[T, H]``, partials of all
        FFN ranks added in fp32 (rank order) and rounded once."""
        if not self.is_attention:
            raise RuntimeError("afdkit.runtime.recv_ffn_output: this is an FFN rank (use recv_attn_output)")
        return self.channel.recv(handle.metadata.layer_idx, handle.metadata.stage_idx)

    # ---- FFN side ---------------------------------------------------------------------------

    def recv_attn_output(self, layer_idx: int, stage_idx: int) -> FFNRequest:
        """Every attention rank's rows of (layer, stage) that this FFN rank must serve."""
        if self.is_attention:
            raise RuntimeError("afdkit.runtime.recv_attn_output: this is an attention rank (use send_attn_output)")
        b = self.channel.recv_batch(layer_idx, stage_idx)
        u_q, u_s, ids, w, home = b.tensors
        return FFNRequest(AfdMetadata(layer_idx, stage_idx), u_q, u_s, ids, w, home.view(-1) == self.ffn_index,
                          list(b.counts))

    def send_ffn_output(self, ffn_output: torch.Tensor, request: FFNRequest) -> None:
        """Returns this rank's (partial) FFN result for ``request``'s rows, same order."""
        if self.is_attention:
            raise RuntimeError("afdkit.runtime.send_ffn_output: this is an attention rank (use recv_ffn_output)")
        if ffn_output.shape != (request.num_tokens, self.config.hidden_size):
            raise ValueError(f"afdkit.runtime.send_ffn_output: ffn_output must be [{request.num_tokens}, "
                             f"{self.config.hidden_size}], got {list(ffn_output.shape)}")
        self.channel.send_back(request.metadata.layer_idx, request.metadata.stage_idx,
                               ffn_output.to(torch.bfloat16).contiguous())

    def pending(self) -> dict[str, int]:
        return self.channel.pending()


__all__ = ["AfdConnector", "ConnectorConfig", "AfdMetadata", "AttnHandle", "FFNRequest"]
