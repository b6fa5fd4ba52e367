#!/usr/bin/env python3
"""Embedding afdkit's AFD connector in a serving engine's decode loop (runs on CPU).

    python3 examples/embedding_connector.py [--layers 4] [--stages 3] [--tokens 5] [--ffn 2]

One attention process and ``--ffn`` FFN processes on this host (UCX over shared
memory). The attention side plays the engine: per layer it sends each stage's
(microbatch's) post-attention hidden states with their top-k routing, keeps computing
the next stages, and adds the FFN result when it needs it. The FFN side serves
``recv_attn_output -> FFN -> send_ffn_output``. Here the "FFN" is a toy expert layer
(expert ``e`` scales a row by ``e + 1``; FFN rank ``f`` holds the experts with
``e % ranks == f``, and the home rank adds the row itself as a "shared expert"), so
the attention side can check every result exactly. See docs/embedding.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import sys

import torch

HIDDEN, TOP_K, EXPERTS = 256, 2, 6


def toy_ffn(u: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, home: torch.Tensor,
            ffn_index: int, ffn_ranks: int) -> torch.Tensor:
    """FFN rank ``ffn_index``'s partial: its experts' weighted outputs (+ u where home)."""
    mine = (topk_ids.long() % ffn_ranks) == ffn_index
    scale = ((topk_ids.float() + 1) * topk_weights * mine).sum(dim=1, keepdim=True)
    return u * scale + u * home.unsqueeze(1)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from torch.distributed import TCPStore

    from afdkit.mesh import Mesh, MeshConfig
    from afdkit.runtime.connector import AfdConnector, AfdMetadata, ConnectorConfig
    from afdkit.runtime.numerics import wire_decode, wire_encode

    role = "attention" if rank == 0 else "ffn"
    mesh = Mesh(rank, world, role, MeshConfig(mesh_id=f"example-{port}", timeout_s=20))
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    mesh.connect(store, b"example-secret")
    n_ffn = world - 1
    owner = tuple(e % n_ffn for e in range(EXPERTS))  # expert e lives on FFN rank e % n_ffn
    conn = AfdConnector(mesh, ConnectorConfig(hidden_size=HIDDEN, top_k=TOP_K, max_tokens=args.tokens,
                                              num_stages=args.stages, mode="routed", expert_owner=owner))
    gen = torch.Generator().manual_seed(0)
    try:
        if role == "attention":
            x = [torch.randn(args.tokens, HIDDEN, generator=gen) for _ in range(args.stages)]
            for layer in range(args.layers):
                handles, sent = [], []
                for s in range(args.stages):  # the engine's attention of each stage, then send
                    u = torch.nn.functional.rms_norm(x[s], (HIDDEN,))
                    ids = torch.randint(0, EXPERTS, (args.tokens, TOP_K), generator=gen, dtype=torch.int32)
                    w = torch.rand(args.tokens, TOP_K, generator=gen)
                    home = torch.arange(args.tokens) % n_ffn
                    handles.append(conn.send_attn_output(u, AfdMetadata(layer, s), topk_ids=ids, topk_weights=w,
                                                         home=home))
                    sent.append((u, ids, w, home))
                for s, h in enumerate(handles):  # ... and add the FFN results when needed
                    y = conn.recv_ffn_output(h)
                    u, ids, w, home = sent[s]
                    u_wire = wire_decode(*wire_encode(u), torch.float32)  # what the FFN ranks saw (FP8)
                    want = torch.zeros_like(u_wire)  # bf16 partials, added in fp32 in rank order
                    for f in range(n_ffn):
                        want += toy_ffn(u_wire, ids, w, home == f, f, n_ffn).bfloat16().float()
                    want = want.bfloat16()
                    assert torch.equal(y, want), f"layer {layer} stage {s}: wrong FFN result"
                    x[s] = x[s] + y.float()
            assert conn.pending() == {"sent": 0, "batches": 0}
            print(f"ok: {args.layers} layers x {args.stages} stages, {n_ffn} FFN ranks, results exact")
        else:
            for layer in range(args.layers):
                for s in range(args.stages):
                    req = conn.recv_attn_output(layer, s)
                    y = toy_ffn(req.hidden(torch.float32), req.topk_ids, req.topk_weights, req.home,
                                conn.ffn_index, conn.num_ffn)
                    conn.send_ffn_output(y, req)
        mesh.close()
    except BaseException:
        mesh.abort()
        raise


def _child(rank: int, world: int, port: int, args: argparse.Namespace, env: dict[str, str]) -> None:
    os.environ.update(env)
    rank_main(rank, world, port, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--tokens", type=int, default=5)
    p.add_argument("--ffn", type=int, default=2)
    args = p.parse_args()
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    world = 1 + args.ffn
    ctx = mp.get_context("spawn")
    env = {"UCX_TLS": os.environ.get("UCX_TLS", "sm,self")}
    procs = [ctx.Process(target=_child, args=(r, world, store.port, args, env)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if any(codes):
        print(f"failed: exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
