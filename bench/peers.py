#!/usr/bin/env python3
"""attnd decode/append next to its peers, measured in one run on one GPU.

Runs attnd's decode_bench (which measures the read and copy ceilings and our kernels), then
times on the same shapes: PyTorch SDPA with the cuDNN and flash backends (dense KV, enable_gqa),
and FlashInfer's paged decode (tensor-core and CUDA-core) and append when `flashinfer` imports.
--fp8 prints instead the fp8 KV table: our fp8 rows against our bf16 rows of the same run, and
FlashInfer's decode over an fp8 (e4m3) cache next to its bf16 one (head_dim 128 cases only, to
keep its JIT builds within one call).
Every peer is timed like ours: CUDA-graph replays of several calls cycling over input copies
larger than L2, median of 30 replays. Prints a markdown table (ours/peer = peer time / our time,
above 1 means we are faster) and writes it to --md.

  python3 bench/peers.py --ours ".device/b/run decode_bench" --md /tmp/results.md
"""
import argparse
import csv
import math
import os
import shlex
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = [  # (B, L, qo, kv, d, page)
    (1, 4096, 32, 8, 128, 16), (16, 4096, 32, 8, 128, 16), (64, 4096, 32, 8, 128, 16),
    (128, 2048, 32, 8, 128, 16), (256, 1024, 32, 8, 128, 16), (32, 32768, 32, 8, 128, 16),
    (64, 4096, 32, 8, 64, 16), (64, 4096, 32, 8, 256, 16), (64, 4096, 8, 8, 128, 16),
    (64, 4096, 64, 8, 128, 16),
]


def case_name(c, det=False):
    b, l, qo, kv, d, p = c
    return f"B{b} L{l} qo{qo} kv{kv} d{d} p{p}" + (" det" if det else "")


def time_graph(fn, per_graph, reps=30):
    """Median ms per call of fn(i) over graph replays of per_graph calls; eager on failure."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(per_graph, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(per_graph):
                fn(i)
        run = g.replay
    except Exception as e:  # noqa: BLE001
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing eagerly)")
        mode = "eager"
        torch.cuda.synchronize()

        def run():
            for i in range(per_graph):
                fn(i)
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    times.sort()
    return times[len(times) // 2], mode


def sdpa_time(c, backend):
    b, l, qo, kv, d, _ = c
    kv_bytes = b * l * kv * d * 2 * 2
    copies = max(1, math.ceil(400e6 / kv_bytes))
    ks = [torch.randn(b, kv, l, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    vs = [torch.randn(b, kv, l, d, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    q = torch.randn(b, qo, 1, d, device="cuda", dtype=torch.bfloat16)

    def fn(i):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies],
                                                  enable_gqa=True)
    try:
        fn(0)
        t, mode = time_graph(fn, max(copies, 10))
    except Exception as e:  # noqa: BLE001
        print(f"  SDPA {backend} failed on {case_name(c)}: {type(e).__name__}: {str(e)[:160]}")
        t, mode = float("nan"), "n/a"
    del ks, vs
    torch.cuda.empty_cache()
    return t, mode


def flashinfer_decode_time(fi, c, tensor_cores, fp8=False):
    b, l, qo, kv, d, p = c
    kv_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    kv_bytes = b * l * kv * d * 2 * (1 if fp8 else 2)
    copies = max(1, math.ceil(400e6 / kv_bytes))
    pages_per_seq = (l + p - 1) // p
    num_pages = pages_per_seq * b * copies
    cache = torch.randn(num_pages, 2, p, kv, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    perm = torch.randperm(num_pages, device="cuda", dtype=torch.int32)
    q = torch.randn(b, qo, d, device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrappers = []
    for cidx in range(copies):
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
        indptr = torch.arange(b + 1, device="cuda", dtype=torch.int32) * pages_per_seq
        indices = perm[cidx * b * pages_per_seq:(cidx + 1) * b * pages_per_seq].contiguous()
        last = torch.full((b,), (l - 1) % p + 1, device="cuda", dtype=torch.int32)
        w.plan(indptr, indices, last, qo, kv, d, p, q_data_type=torch.bfloat16,
               kv_data_type=kv_dtype)
        wrappers.append(w)

    def fn(i):
        return wrappers[i % copies].run(q, cache)
    try:
        fn(0)
        t, mode = time_graph(fn, max(copies, 10))
    except Exception as e:  # noqa: BLE001
        print(f"  FlashInfer failed on {case_name(c)}: {type(e).__name__}: {str(e)[:200]}")
        t, mode = float("nan"), "n/a"
    del cache, wrappers
    torch.cuda.empty_cache()
    return t, mode


def flashinfer_append_time(fi, n):
    kvh, d, p = 8, 128, 16
    num_pages = 65536
    copies = 8
    cache = torch.zeros(num_pages, 2, p, kvh, d, device="cuda", dtype=torch.bfloat16)
    ks = torch.randn(copies, n, kvh, d, device="cuda", dtype=torch.bfloat16)
    vs = torch.randn(copies, n, kvh, d, device="cuda", dtype=torch.bfloat16)
    if n == 4096:  # one sequence of n new tokens
        batch = 1
        pages = torch.randperm(num_pages, device="cuda", dtype=torch.int32)[:copies * n // p]
        per = n // p
        args = []
        for c in range(copies):
            indptr = torch.tensor([0, per], device="cuda", dtype=torch.int32)
            indices = pages[c * per:(c + 1) * per].contiguous()
            last = torch.tensor([p], device="cuda", dtype=torch.int32)
            bi = torch.zeros(n, device="cuda", dtype=torch.int32)
            pos = torch.arange(n, device="cuda", dtype=torch.int32)
            args.append((bi, pos, indices, indptr, last))
    else:  # n sequences, one new token each at a random slot of its own page
        batch = n
        pages = torch.randperm(num_pages, device="cuda", dtype=torch.int32)[:copies * n]
        args = []
        for c in range(copies):
            indptr = torch.arange(n + 1, device="cuda", dtype=torch.int32)
            indices = pages[c * n:(c + 1) * n].contiguous()
            last = torch.randint(1, p + 1, (n,), device="cuda", dtype=torch.int32)
            bi = torch.arange(n, device="cuda", dtype=torch.int32)
            pos = last - 1
            args.append((bi, pos, indices, indptr, last))
    del batch

    def fn(i):
        bi, pos, indices, indptr, last = args[i % copies]
        fi.append_paged_kv_cache(ks[i % copies], vs[i % copies], bi, pos, cache, indices, indptr,
                                 last, kv_layout="NHD")
    try:
        fn(0)
        t, mode = time_graph(fn, copies * 4)
    except Exception as e:  # noqa: BLE001
        print(f"  FlashInfer append failed: {type(e).__name__}: {str(e)[:200]}")
        t, mode = float("nan"), "n/a"
    return t, mode


def fmt(x, nd=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def fp8_table(ours, fi):
    """Our fp8 decode rows next to our bf16 ones and FlashInfer's, same run."""
    lines = ["| case (q bf16, KV e4m3, page 16) | ours bf16 µs | ours fp8 µs | fp8 tokens/s ÷ bf16 |"
             " fp8 % read ceiling | FI tc bf16 µs | FI tc fp8 µs | FI cuda-core fp8 µs |"
             " FI fp8 ÷ bf16 (tc) | ours fp8 / FI fp8 (best) | ours fp8/token µs |"
             " fp8/token tokens/s ÷ bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in CASES:
        for det in (False, True):
            o = ours.get(("decode", case_name(c, det)))
            f = ours.get(("decode", case_name(c, det) + " fp8"))
            t = ours.get(("decode", case_name(c, det) + " fp8/token"))
            if o is None or f is None:
                continue
            us, fus = float(o["us"]), float(f["us"])
            tus = float(t["us"]) if t is not None else float("nan")
            fib = fit = fic = float("nan")
            if fi is not None and not det and c[4] == 128:
                fib, _ = flashinfer_decode_time(fi, c, True)
                fit, _ = flashinfer_decode_time(fi, c, True, fp8=True)
                fic, _ = flashinfer_decode_time(fi, c, False, fp8=True)
            best = min(x for x in (fit, fic, float("inf")) if x == x)
            row = (f"| {case_name(c, det)} | {us:.2f} | {fus:.2f} | {us / fus:.2f} | "
                   f"{float(f['pct']):.1f} | {fmt(fib * 1e3, 2)} | {fmt(fit * 1e3, 2)} | "
                   f"{fmt(fic * 1e3, 2)} | {fmt(fib / fit, 2)} | "
                   f"{fmt(best * 1e3 / fus if best != float('inf') else float('nan'), 2)} | "
                   f"{fmt(tus, 2)} | {fmt(us / tus, 2)} |")
            print(row, flush=True)
            lines.append(row)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="command that runs decode_bench")
    ap.add_argument("--md", default=None)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="the fp8 KV table only")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ours.csv")
        rc = subprocess.run(shlex.split(args.ours) + ["--csv", path]).returncode
        if rc != 0:
            print(f"decode_bench exited with {rc}; using the rows it wrote")
        ours = {(r["kind"], r["name"]): r for r in csv.DictReader(open(path))}
    read_gbs = float(ours[("ceiling", "read")]["gbs"])
    copy_gbs = float(ours[("ceiling", "copy")]["gbs"])

    fi = None
    if not args.no_flashinfer:
        try:
            import flashinfer as fi  # noqa: F811
            print("flashinfer", fi.__version__)
        except Exception as e:  # noqa: BLE001
            print(f"flashinfer unavailable: {type(e).__name__}: {str(e)[:300]}")
            fi = None

    dev = torch.cuda.get_device_name()
    head = [f"device: {dev}; torch {torch.__version__}; flashinfer "
            f"{fi.__version__ if fi else 'not run'}",
            f"read ceiling {read_gbs:.0f} GB/s, copy {copy_gbs:.0f} GB/s (read+write), "
            "measured by decode_bench in this run", ""]
    if args.fp8:
        text = "\n".join(head + fp8_table(ours, fi)) + "\n"
        print("\n" + text)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        return 0
    lines = head + [
             "| case (bf16, page 16) | ours µs | ours GB/s | % read ceiling | det µs | det cost |"
             " cuDNN µs | flash µs | FI tc µs | FI cuda-core µs | ours/cuDNN | ours/FI tc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in CASES:
        o = ours.get(("decode", case_name(c)))
        od = ours.get(("decode", case_name(c, True)))
        if o is None:
            continue
        us = float(o["us"])
        det_us = float(od["us"]) if od else float("nan")
        cud, _ = sdpa_time(c, SDPBackend.CUDNN_ATTENTION)
        fla, _ = sdpa_time(c, SDPBackend.FLASH_ATTENTION)
        fit = fic = float("nan")
        if fi is not None:
            fit, _ = flashinfer_decode_time(fi, c, True)
            fic, _ = flashinfer_decode_time(fi, c, False)
        row = (f"| {case_name(c)} | {us:.2f} | {float(o['gbs']):.0f} | {float(o['pct']):.1f} | "
               f"{fmt(det_us, 2)} | {fmt(100 * (det_us / us - 1))}% | {fmt(cud * 1e3, 2)} | "
               f"{fmt(fla * 1e3, 2)} | {fmt(fit * 1e3, 2)} | {fmt(fic * 1e3, 2)} | "
               f"{fmt(cud * 1e3 / us, 2)} | {fmt(fit * 1e3 / us, 2)} |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", "| append (8 kv heads × 128, page 16) | ours µs | ours GB/s | % copy | FI µs |"
              " ours/FI |", "|---|---|---|---|---|---|"]
    for n in (256, 4096):
        o = ours.get(("append", f"{n} tokens"))
        if o is None:
            continue
        fa = float("nan")
        if fi is not None:
            fa, _ = flashinfer_append_time(fi, n)
        us = float(o["us"])
        label = "256 × 1 token" if n == 256 else "1 × 4096 tokens"
        row = (f"| {label} | {us:.2f} | {float(o['gbs']):.0f} | {float(o['pct']):.1f} | "
               f"{fmt(fa * 1e3, 2)} | {fmt(fa * 1e3 / us, 2)} |")
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
