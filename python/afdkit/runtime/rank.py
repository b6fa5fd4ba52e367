"""One process of a run: build the worker of this rank, connect, decode, report.

:func:`run_rank` is what every process executes, whether the local launcher spawned
it or torchrun started it. It returns a plain dict (picklable, JSON-able apart from
tensors) that :mod:`afdkit.runtime.report` turns into the results table and traces.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from afdkit.runtime.checkpoint import RandomSource, SafetensorsSource, TensorSource
from afdkit.runtime.config import RunConfig
from afdkit.runtime.numerics import Numerics
from afdkit.runtime.timing import StageRecorder
from afdkit.runtime.worker import AttentionWorker, FFNWorker, LocalFFN, RemoteFFN, colocated_shards

Progress = Callable[[int, int], None]  # (rank, finished step)


def weight_source(cfg: RunConfig, numerics: Numerics) -> TensorSource:
    if cfg.checkpoint:
        return SafetensorsSource(cfg.checkpoint)
    dtype = torch.bfloat16 if numerics.is_cuda else torch.float32
    return RandomSource(cfg.model_config(), cfg.seed, numerics.device, dtype)


def rank_numerics(cfg: RunConfig, local_rank: int) -> Numerics:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("afdkit run: --device cuda but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"afdkit run: local rank {local_rank} needs GPU {local_rank}, but this host has "
                               f"{torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        return Numerics.for_device(f"cuda:{local_rank}")
    return Numerics.for_device("cpu")


def _result(rank: int, role: str, rec: StageRecorder, **extra: Any) -> dict[str, Any]:
    return {"rank": rank, "role": role, "spans": [s.as_tuple() for s in rec.resolve()],
            "step_ends_ns": list(rec.step_ends_ns), **extra}


def run_colocated_rank(cfg: RunConfig, rank: int, local_rank: int, progress: Progress | None = None) -> dict[str, Any]:
    """The colocated baseline: this process holds the whole model and decodes its
    share of the batch alone (one microbatch: nothing to overlap with)."""
    numerics = rank_numerics(cfg, local_rank)
    config = cfg.model_config()
    source = weight_source(cfg, numerics)
    seqs = cfg.sequences(rank)
    rec = StageRecorder(cuda=numerics.is_cuda)
    worker = AttentionWorker(config, source, numerics, seqs, context=cfg.context, steps=cfg.steps,
                             num_microbatches=1, num_ffn=1, seed=cfg.seed, recorder=rec)
    ffn = LocalFFN(colocated_shards(config, source, numerics, "broadcast", 1))
    res = worker.run(ffn, on_step=None if progress is None else (lambda s: progress(rank, s)))
    return _result(rank, "colocated", rec, seq_ids=res.seq_ids, tokens=res.tokens.tolist(), mesh_events=[])


def run_afd_rank(cfg: RunConfig, rank: int, local_rank: int, store: Any, secret: bytes, mesh_id: str,
                 progress: Progress | None = None) -> dict[str, Any]:
    """One attention or FFN worker of an AFD run, connected through the mesh."""
    from afdkit.mesh import Mesh, MeshConfig
    from afdkit.mesh.bootstrap import barrier
    from afdkit.runtime.connector import AfdConnector, ConnectorConfig
    from afdkit.runtime.ffn import ShardSpec

    numerics = rank_numerics(cfg, local_rank)
    config = cfg.model_config()
    role = cfg.role(rank)
    source = weight_source(cfg, numerics)
    rec = StageRecorder(cuda=numerics.is_cuda)
    on_step = None if progress is None else (lambda s: progress(rank, s))
    # Build the worker (weights, caches) before joining: the mesh timeout then bounds
    # only the decode, not the time a slow rank needs to load.
    if role == "attention":
        seqs = cfg.sequences(rank)
        worker: AttentionWorker | FFNWorker = AttentionWorker(
            config, source, numerics, seqs, context=cfg.context, steps=cfg.steps,
            num_microbatches=cfg.microbatches, num_ffn=cfg.ffn, seed=cfg.seed, recorder=rec)
    else:
        spec = ShardSpec(cfg.routing, rank - cfg.attention, cfg.ffn, cfg.expert_owner())
        worker = FFNWorker(config, source, numerics, spec, steps=cfg.steps, num_microbatches=cfg.microbatches,
                           recorder=rec)
    mesh = Mesh(rank, cfg.world_size, role,
                MeshConfig(mesh_id=mesh_id, timeout_s=cfg.timeout_s, keepalive_s=min(1.0, cfg.timeout_s / 4),
                           device=numerics.device.index if numerics.is_cuda else None, trace=cfg.trace))
    ok = False
    try:
        # Joining waits for the slowest rank's setup: allow for it beyond the mesh timeout.
        mesh.connect(store, secret, timeout_s=max(cfg.timeout_s, 600.0))
        max_rows = max(1, -(-max(len(cfg.sequences(a)) for a in range(cfg.attention)) // cfg.microbatches))
        conn = AfdConnector(mesh, ConnectorConfig(
            hidden_size=config.hidden_size, top_k=config.moe_top_k, max_tokens=max_rows,
            num_stages=cfg.microbatches, mode=cfg.routing, expert_owner=cfg.expert_owner() or None,
            device=str(numerics.device), num_layers=config.num_hidden_layers,
            stream_ordered=cfg.channel == "stream"))
        t0 = time.monotonic_ns()
        if isinstance(worker, AttentionWorker):
            res = worker.run(RemoteFFN(conn), on_step=on_step)
            extra: dict[str, Any] = {"seq_ids": res.seq_ids, "tokens": res.tokens.tolist()}
        else:
            extra = {"rows_served": worker.run(conn, on_step=on_step)}
        leaks = conn.pending()
        if any(leaks.values()):
            raise RuntimeError(f"afdkit run: rank {rank} ({role}) finished with open channel requests {leaks}")
        extra["mesh_events"] = mesh.trace_events() if cfg.trace else []
        extra["start_ns"] = t0
        ok = True
        return _result(rank, role, rec, **extra)
    finally:
        if ok:
            # Close only when every rank is done: an attention rank's last receive still
            # acknowledges its slot to the FFN ranks, which must not have left by then.
            barrier(store, mesh_id, "afdkit.run/done", rank, cfg.world_size, cfg.timeout_s)
            mesh.close()
        else:
            try:
                mesh.abort()  # every peer's pending call fails now instead of at its timeout
                mesh.close(timeout_s=min(2.0, cfg.timeout_s))
            except Exception:  # noqa: BLE001 - the original error is what the user must see
                pass


def reference_tokens(cfg: RunConfig, device: str = "cpu") -> dict[int, list[int]]:
    """The tokens an AFD run of ``cfg`` must produce, computed in this process: the
    colocated model holding the whole batch, its FFN split into the same shards and
    joined with the same wire formats and reduction as the AFD run."""
    numerics = Numerics.for_device(device)
    config = cfg.model_config()
    source = weight_source(cfg, numerics)
    seqs = list(range(cfg.batch))
    worker = AttentionWorker(config, source, numerics, seqs, context=cfg.context, steps=cfg.steps,
                             num_microbatches=1, num_ffn=cfg.ffn, seed=cfg.seed,
                             recorder=StageRecorder(cuda=numerics.is_cuda, enabled=False))
    ffn = LocalFFN(colocated_shards(config, source, numerics, cfg.routing, cfg.ffn, cfg.expert_owner()))
    res = worker.run(ffn)
    return {sid: res.tokens[i].tolist() for i, sid in enumerate(res.seq_ids)}


__all__ = ["run_afd_rank", "run_colocated_rank", "reference_tokens", "weight_source", "rank_numerics"]
