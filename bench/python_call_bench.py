#!/usr/bin/env python3
"""Python per-call host time of attnd's native data path (issue 10's target: enqueue to return,
pipelined, one layer, batch 64, <= 30 us p50), next to the per-layer call a model loop makes.

    python3 bench/python_call_bench.py --target unix:///tmp/attnd.sock [--batch 64] [--context 4096]

Needs a CUDA attnd (any model; the bench reads it from the server) and torch. Three rows, each
the median and p99 of --calls calls on one layer, sequences at --context tokens:
  - attention(): AttndTorch.attention with inputs already in the region (no copies): record the
    wait event, send, receive attnd's answer, make the stream wait on the signal event;
  - send, pipelined: NativeStream.send of the same call with only a signal event, --depth calls
    in flight before their answers are read (what a runner that does not need the outputs
    before its next call pays per call);
  - receive: reading one answer of those pipelined calls.
Lengths are rolled back every 256 calls (untimed), so every call attends over ~context tokens.
"""

import argparse
import statistics
import time

import torch

from attnd_client.torch import AttndTorch


def percentiles(us):
    us = sorted(us)
    return statistics.median(us), us[min(len(us) - 1, int(len(us) * 0.99))]


def fill(at, seq_ids, context):
    """Creates the sequences and gives each `context - 1` tokens at layer 0 through Append."""
    for s in seq_ids:
        at.create_sequence(s)
    m = at.model
    chunk = max(1, at.max_tokens // max(1, len(seq_ids)))
    done = 0
    while done < context - 1:
        n = min(chunk, context - 1 - done)
        at.set_batch(seq_ids, [n] * len(seq_ids))
        t = n * len(seq_ids)
        at.append(0, torch.randn(t, m["num_kv_heads"], m["head_dim"], dtype=m["dtype"],
                                 device=at.k_new.device),
                  torch.randn(t, m["num_kv_heads"], m["head_dim"], dtype=m["dtype"],
                              device=at.k_new.device))
        done += n
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="unix:///tmp/attnd.sock")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=8)
    a = ap.parse_args()
    at = AttndTorch.connect(a.target, max_tokens=max(a.batch, 8192))
    seq_ids = list(range(1, a.batch + 1))
    fill(at, seq_ids, a.context)
    at.set_batch(seq_ids, [1] * a.batch)
    q, k, v = at.q[:a.batch], at.k_new[:a.batch], at.v_new[:a.batch]
    for buf in (q, k, v):
        buf.normal_()

    def rollback(i):
        if i % 256 == 255:
            torch.cuda.synchronize()
            for s in seq_ids:
                at.truncate_sequence(s, a.context - 1)

    call_us = []
    for i in range(a.calls + 50):
        t0 = time.perf_counter()
        at.attention(0, q, k, v)
        t1 = time.perf_counter()
        if i >= 50:
            call_us.append((t1 - t0) * 1e6)
        rollback(i)
    torch.cuda.synchronize()
    for s in seq_ids:
        at.truncate_sequence(s, a.context - 1)

    # Pipelined: the same Decode with only a signal event, `depth` in flight.
    call = at._attn_call  # the step's prebuilt call (private: this bench measures the path)
    call.set_events(wait_event=None, signal_event=at._signal_name)
    stream = at._native
    send_us, recv_us = [], []
    sent = 0
    while sent < a.calls + 50:
        for _ in range(a.depth):
            t0 = time.perf_counter()
            stream.send(call)
            t1 = time.perf_counter()
            if sent >= 50:
                send_us.append((t1 - t0) * 1e6)
            sent += 1
        for _ in range(a.depth):
            t0 = time.perf_counter()
            stream.receive(False)
            recv_us.append((time.perf_counter() - t0) * 1e6)
        at._signal.synchronize()
        if sent % 256 < a.depth:
            for s in seq_ids:
                at.truncate_sequence(s, a.context - 1)
    call.set_events(wait_event=at._wait_name, signal_event=at._signal_name)

    print(f"python_call_bench on {torch.cuda.get_device_name()}: one layer, batch {a.batch}, "
          f"context ~{a.context}, {a.calls} calls, depth {a.depth}; host µs")
    print("| path | p50 µs | p99 µs |\n|---|---|---|")
    for name, us in (("attention() (record, send, answer, stream wait)", call_us),
                     (f"send, pipelined ({a.depth} in flight, signal event)", send_us),
                     ("receive one pipelined answer", recv_us)):
        p50, p99 = percentiles(us)
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")
    at.close()


if __name__ == "__main__":
    main()
