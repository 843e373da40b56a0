#!/usr/bin/env python3
"""attnd batch prefill next to its peers, measured in one run on one GPU.

Runs attnd's prefill_bench (mma.sync ceiling, our kernels), measures the bf16 matmul ceiling
(torch.matmul 8192^3, cuBLAS), then times on the same shapes PyTorch SDPA (flash and cuDNN
backends, dense q/k/v, enable_gqa) and FlashInfer's BatchPrefillWithPagedKVCacheWrapper (paged,
NHD, page 16, same page-table shape; backend fa2, and fa3 with --fa3) when flashinfer imports.
Timing as bench/peers.py: CUDA-graph replays, median of 30. TFLOP/s counts 4 * d * qo heads per
visible (query, key) pair; ours/peer = peer time / our time (above 1: we are faster).

  python3 bench/prefill_peers.py --ours ".device/b/run prefill_bench" --md /tmp/prefill.md
  ncu ... python3 bench/prefill_peers.py --fa3 --no-fa2 --only noncausal --ours "... prefill_bench --quick"
"""
import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import time_graph, fmt  # noqa: E402

QO, KV, PAGE = 32, 8, 16
# (name in prefill_bench, requests [(q_len, kv_len)], d, causal, dense (B, S) or None)
CASES = [
    ("causal B1 S4096 d128", [(4096, 4096)], 128, True, (1, 4096)),
    ("causal B1 S8192 d128", [(8192, 8192)], 128, True, (1, 8192)),
    ("noncausal B4 S2048 d128", [(2048, 2048)] * 4, 128, False, (4, 2048)),
    ("causal B1 S4096 d64", [(4096, 4096)], 64, True, (1, 4096)),
]
MIXED = [(2048, 4096)] + [(1, 4096)] * 128


def flops(reqs, d, causal):
    pairs = 0.0
    for q, k in reqs:
        pairs += q * (k - q) + 0.5 * q * (q + 1) if causal else q * k
    return 4.0 * d * QO * pairs


def matmul_ceiling():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t, _ = time_graph(lambda i: torch.matmul(a, b), 10)
    return 2 * n ** 3 / t / 1e9


def sdpa_time(b, s, d, causal, backend):
    q = torch.randn(b, QO, s, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, KV, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, KV, s, d, device="cuda", dtype=torch.bfloat16)

    def fn(i):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    try:
        fn(0)
        t, _ = time_graph(fn, 4)
    except Exception as e:  # noqa: BLE001
        print(f"  SDPA {backend} failed: {type(e).__name__}: {str(e)[:160]}")
        t = float("nan")
    return t


def flashinfer_time(fi, reqs, d, causal, backend):
    pages_per = [(k + PAGE - 1) // PAGE for _, k in reqs]
    num_pages = sum(pages_per)
    cache = torch.randn(num_pages, 2, PAGE, KV, d, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(num_pages, device="cuda", dtype=torch.int32)
    kv_indptr = torch.tensor([0] + list(torch.tensor(pages_per).cumsum(0).tolist()),
                             device="cuda", dtype=torch.int32)
    qo_indptr = torch.tensor([0] + list(torch.tensor([q for q, _ in reqs]).cumsum(0).tolist()),
                             device="cuda", dtype=torch.int32)
    last = torch.tensor([(k - 1) % PAGE + 1 for _, k in reqs], device="cuda", dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), QO, d, device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    try:
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
        w.plan(qo_indptr, kv_indptr, perm, last, QO, KV, d, PAGE, causal=causal,
               q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        w.run(q, cache)
        t, _ = time_graph(lambda i: w.run(q, cache), 4)
    except Exception as e:  # noqa: BLE001
        print(f"  FlashInfer {backend} failed: {type(e).__name__}: {str(e)[:200]}")
        t = float("nan")
    del cache, ws
    torch.cuda.empty_cache()
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="command that runs prefill_bench")
    ap.add_argument("--md", default=None)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--fa3", action="store_true", help="also FlashInfer's fa3 backend")
    ap.add_argument("--no-fa2", action="store_true", help="skip FlashInfer's fa2 backend")
    ap.add_argument("--only", default=None,
                    help="the cases whose name contains TEXT, without the mixed rows (ncu)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ours.csv")
        rc = subprocess.run(shlex.split(args.ours) + ["--csv", path]).returncode
        if rc != 0:
            print(f"prefill_bench exited with {rc}; using the rows it wrote")
        ours = {(r["kind"], r["name"]): r for r in csv.DictReader(open(path))}
    mma_tf = float(ours[("ceiling", "mma.sync bf16")]["tflops"])
    mm_tf = matmul_ceiling()
    print(f"matmul ceiling {mm_tf:.0f} TFLOP/s, mma.sync ceiling {mma_tf:.0f}", flush=True)
    fi = None
    if not args.no_flashinfer:
        try:
            import flashinfer as fi  # noqa: F811
            print("flashinfer", fi.__version__, flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"flashinfer unavailable: {type(e).__name__}: {str(e)[:300]}")
    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; flashinfer "
             f"{fi.__version__ if fi else 'not run'}",
             f"bf16 matmul ceiling (torch.matmul 8192^3) {mm_tf:.0f} TFLOP/s; mma.sync m16n8k16 "
             f"ceiling {mma_tf:.0f} TFLOP/s (prefill_bench), both in this run", "",
             "| case (bf16, 32 qo / 8 kv heads, page 16) | ours µs | ours TFLOP/s | % matmul |"
             " % mma.sync | flash TFLOP/s | cuDNN TFLOP/s | FI fa2 TFLOP/s | FI fa3 TFLOP/s |"
             " ours/flash | ours/cuDNN | ours/FI fa2 | ours/FI fa3 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, reqs, d, causal, dense in CASES:
        o = ours.get(("prefill", name))
        if o is None or (args.only is not None and args.only not in name):
            continue
        us = float(o["us"])
        fl = flops(reqs, d, causal)
        tf = fl / us / 1e6
        fla = sdpa_time(dense[0], dense[1], d, causal, SDPBackend.FLASH_ATTENTION)
        cud = sdpa_time(dense[0], dense[1], d, causal, SDPBackend.CUDNN_ATTENTION)
        f2 = f3 = float("nan")
        if fi is not None:
            if not args.no_fa2:
                f2 = flashinfer_time(fi, reqs, d, causal, "fa2")
            if args.fa3:
                f3 = flashinfer_time(fi, reqs, d, causal, "fa3")
        tfs = [fl / (t * 1e9) for t in (fla, cud, f2, f3)]
        row = (f"| {name} | {us:.1f} | {tf:.0f} | {100 * tf / mm_tf:.1f} | "
               f"{100 * tf / mma_tf:.1f} | " + " | ".join(fmt(x, 0) for x in tfs) + " | " +
               " | ".join(fmt(t * 1e3 / us, 2) for t in (fla, cud, f2, f3)) + " |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", "| the portable (mma.sync) kernel on the same cases | µs | TFLOP/s | % mma.sync |",
              "|---|---|---|---|"]
    for (kind, name), r in ours.items():
        if kind == "portable":
            lines.append(f"| {name} | {float(r['us']):.1f} | {float(r['tflops']):.0f} | "
                         f"{100 * float(r['tflops']) / mma_tf:.1f} |")
    lines += ["", "| mixed: 1 × 2048-token chunk at 4096 context + 128 decodes at 4096 | µs |"
              " TFLOP/s | items | merges |", "|---|---|---|---|---|"]
    for (kind, name), r in ours.items():
        if kind == "mixed":
            lines.append(f"| {name} | {float(r['us']):.1f} | {float(r['tflops']):.0f} | "
                         f"{r['items']} | {r['merges']} |")
    if fi is not None and args.only is None and not args.no_fa2:
        f2 = flashinfer_time(fi, MIXED, 128, True, "fa2")
        lines.append(f"| FlashInfer fa2, one launch | {fmt(f2 * 1e3)} | "
                     f"{fmt(flops(MIXED, 128, True) / (f2 * 1e9), 0)} | | |")
    for (kind, name), r in ours.items():
        if kind == "prefill" and name.endswith("det"):
            lines.append(f"| (deterministic) {name} | {float(r['us']):.1f} | "
                         f"{float(r['tflops']):.0f} | {r['items']} | {r['merges']} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
