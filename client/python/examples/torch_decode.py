#!/usr/bin/env python3
"""Prefill and decode a batch through attnd from PyTorch, every output checked against SDPA.

    scripts/build.sh attnd attnd_c                 # on the GPU machine, CUDA build
    nvidia-cuda-mps-control -d                     # MPS: no context switch per call
    build/server/attnd --backend=cuda --num_layers=4 --num_qo_heads=32 --num_kv_heads=8 \\
        --head_dim=128 --dtype=bf16 &
    pip install './client/python[torch]'
    python3 client/python/examples/torch_decode.py --target unix:///tmp/attnd.sock

Creates --batch sequences, prefills random prompts of up to --prompt tokens (one Prefill per
layer for the whole batch), then runs --steps decode steps, each a loop over the layers with
one attention() call per layer: q/k/v come from torch on the current stream, attnd computes
attention on the same GPU, and the output is ready on the current stream, with no host
synchronisation. Each output is compared with fp32 SDPA over the K/V this script fed in.
"""

import argparse
import secrets
import sys
import time

import torch
import torch.nn.functional as F

from attnd_client.torch import AttndTorch


def sdpa(q, k, v, scale):
    """fp32 causal SDPA of q [n, hq, d] at the last n positions of k, v [L, hk, d]."""
    n, hq, _ = q.shape
    length, hk, _ = k.shape
    qf, kf, vf = (x.float().repeat_interleave(hq // x.shape[1], dim=1).transpose(0, 1)
                  for x in (q, k, v))
    pos = torch.arange(length - n, length, device=q.device)[:, None]
    mask = torch.arange(length, device=q.device)[None, :] <= pos
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale).transpose(0, 1)


def run_step(attn, seqs, counts, history, worst):
    """One step: set_batch, then one attention() per layer; returns host µs per call."""
    m = attn.model
    attn.set_batch(seqs, counts)
    total = sum(counts)
    host_us = []
    for layer in range(m["num_layers"]):
        q, k, v = (torch.randn(total, h, m["head_dim"], dtype=m["dtype"], device="cuda")
                   for h in (m["num_qo_heads"], m["num_kv_heads"], m["num_kv_heads"]))
        start = time.perf_counter()
        out = attn.attention(layer, q, k, v)  # ready on the current stream
        host_us.append((time.perf_counter() - start) * 1e6)
        row = 0
        for s, n in zip(seqs, counts):
            old_k, old_v = history[s, layer]
            history[s, layer] = (torch.cat([old_k, k[row:row + n]]),
                                 torch.cat([old_v, v[row:row + n]]))
            ref = sdpa(q[row:row + n], *history[s, layer], m["sm_scale"])
            err = float((out[row:row + n].float() - ref).norm() / ref.norm())
            worst[0] = max(worst[0], err)
            row += n
    return host_us


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="unix:///tmp/attnd.sock")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=100, help="longest prompt, tokens")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-2, help="relative L2 (bf16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.cuda.set_device(args.device)

    with AttndTorch.connect(args.target, device=args.device,
                            max_tokens=args.batch * args.prompt) as attn:
        m = attn.model
        print(f"attnd model: {m['num_layers']} layers, {m['num_qo_heads']}/{m['num_kv_heads']} "
              f"heads x {m['head_dim']}, {m['dtype']}, page size {m['page_size']}")
        seqs = [secrets.randbits(48) for _ in range(args.batch)]
        prompts = [max(1, args.prompt - 7 * i) for i in range(args.batch)]
        empty = torch.empty(0, m["num_kv_heads"], m["head_dim"], dtype=m["dtype"],
                            device="cuda")
        history = {(s, layer): (empty, empty) for s in seqs for layer in range(m["num_layers"])}
        worst = [0.0]
        for s in seqs:
            attn.create_sequence(s)
        try:
            run_step(attn, seqs, prompts, history, worst)  # Prefill: the prompts
            print(f"prefilled {args.batch} prompts of {min(prompts)}..{max(prompts)} tokens")
            host_us = []
            for _ in range(args.steps):  # Decode: one new token per sequence
                host_us += run_step(attn, seqs, [1] * args.batch, history, worst)
            host_us.sort()
            print(f"decoded {args.steps} steps; host time per attention() call: "
                  f"p50 {host_us[len(host_us) // 2]:.1f} µs (with the input copies)")
            lengths = attn.sequence_lengths(seqs[0])
            print(f"sequence {seqs[0]}: {lengths[0]} tokens per layer")
        finally:
            for s in seqs:
                attn.release_sequence(s)
    ok = worst[0] <= args.tolerance
    print(f"worst relative L2 error against SDPA {worst[0]:.2e} (tolerance "
          f"{args.tolerance:.0e}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
