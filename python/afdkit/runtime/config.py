"""What one ``afdkit run`` does: topology, model, shapes, numerics (:class:`RunConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from afdkit.models.step3 import Step3Config
from afdkit.runtime.ffn import MODES, default_expert_owner

MODELS = ("tiny", "full")
TRANSPORTS = ("shm", "tcp", "auto")


@dataclass(frozen=True)
class RunConfig:
    attention: int = 1            # attention processes (M)
    ffn: int = 1                  # FFN processes (N)
    model: str = "tiny"           # "tiny" or "full" (Step-3 widths)
    layers: int | None = None     # None: all layers of the model
    batch: int = 6                # sequences decoded together, over all attention workers
    context: int = 16             # tokens already cached per sequence when decoding starts
    steps: int = 8                # tokens generated per sequence
    microbatches: int = 3         # in flight per attention worker
    routing: str = "broadcast"    # FFN split: "broadcast" (TP) or "routed" (EP)
    device: str = "cpu"           # "cpu" or "cuda" (one GPU per process, by local rank)
    colocated: bool = False       # run the colocated baseline instead of AFD
    seed: int = 0
    checkpoint: str | None = None  # safetensors file/folder; None: seeded random weights
    warmup_steps: int = 1         # steps left out of the statistics
    timeout_s: float = 30.0       # mesh timeout: how long a wait may last before it fails
    transport: str = "shm"        # CPU UCX transport for local runs ("auto": UCX decides)
    trace: bool = True            # mesh message tracing (transfer times, Chrome trace)
    channel: str = "host"         # GPU AFD channel: "host" (host-waited) or "stream" (stream-ordered, ipc)

    def validate(self) -> None:
        """Raises ValueError with a message fit for a usage error."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.attention >= 1, f"--attention must be >= 1, got {self.attention}")
        need(self.ffn >= 1, f"--ffn must be >= 1, got {self.ffn}")
        need(self.model in MODELS, f"--model must be one of {MODELS}, got {self.model!r}")
        need(self.routing in MODES, f"--routing must be one of {MODES}, got {self.routing!r}")
        need(self.device in ("cpu", "cuda"), f"--device must be 'cpu' or 'cuda', got {self.device!r}")
        need(self.transport in TRANSPORTS, f"--transport must be one of {TRANSPORTS}, got {self.transport!r}")
        need(self.channel in ("host", "stream"), f"--channel must be 'host' or 'stream', got {self.channel!r}")
        need(self.channel == "host" or self.device == "cuda",
             "--channel stream needs --device cuda (the stream-ordered protocol runs on CUDA streams)")
        for name in ("batch", "steps", "microbatches"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.context >= 0, f"--context must be >= 0, got {self.context}")
        need(self.layers is None or self.layers >= 1, f"--layers must be >= 1, got {self.layers}")
        need(0 <= self.warmup_steps < self.steps,
             f"--warmup-steps must be in [0, --steps), got {self.warmup_steps} with {self.steps} steps")
        need(self.timeout_s > 0, f"--timeout must be > 0, got {self.timeout_s}")
        need(self.batch >= self.attention, f"--batch ({self.batch}) must be at least --attention ({self.attention}): "
             "every attention worker needs a sequence")
        cfg = self.model_config()
        need(self.context + self.steps <= cfg.max_position_embedding,
             f"--context + --steps ({self.context + self.steps}) exceeds the model's "
             f"{cfg.max_position_embedding} positions")
        if not self.colocated:
            need(min(cfg.intermediate_size, cfg.moe_intermediate_size, cfg.share_expert_dim) >= self.ffn,
                 f"--ffn {self.ffn} exceeds an FFN width of the model")
            if self.routing == "routed":
                need(self.ffn <= cfg.moe_num_experts,
                     f"--ffn {self.ffn} exceeds the {cfg.moe_num_experts} experts (routed mode)")

    @property
    def world_size(self) -> int:
        return self.attention + self.ffn

    def model_config(self) -> Step3Config:
        return model_config(self.model, self.layers)

    def expert_owner(self) -> tuple[int, ...]:
        cfg = self.model_config()
        return default_expert_owner(cfg.moe_num_experts, self.ffn) if self.routing == "routed" else ()

    def role(self, rank: int) -> str:
        return "attention" if rank < self.attention else "ffn"

    def sequences(self, rank: int) -> list[int]:
        """Global ids of the sequences a rank decodes: attention ranks (AFD) or every
        rank (colocated) take contiguous blocks of the batch."""
        parts = self.world_size if self.colocated else self.attention
        if not self.colocated and rank >= self.attention:
            return []
        base, extra = divmod(self.batch, parts)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (1 if rank < extra else 0)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config(model: str, layers: int | None = None) -> Step3Config:
    """Step-3 ``full`` or ``tiny``, optionally cut to ``layers`` layers.

    A cut model keeps the presets' shape: a dense first and last layer around MoE
    layers (one layer: MoE; two: dense then MoE). With all layers it is the preset.
    """
    base = Step3Config.full() if model == "full" else Step3Config.tiny()
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if layers is None or layers == base.num_hidden_layers:
        return base
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    moe = (0,) if layers == 1 else (1,) if layers == 2 else tuple(range(1, layers - 1))
    return dataclasses.replace(base, num_hidden_layers=layers, moe_layers_enum=moe)


__all__ = ["RunConfig", "model_config", "MODELS", "TRANSPORTS"]
