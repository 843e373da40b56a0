#!/usr/bin/env python3
"""A prefill + decode round trip through attnd from Python, every output checked.

    pip install -r client/python/requirements.txt
    PYTHONPATH=client/python python3 client/python/example.py --target unix:///tmp/attnd.sock

Shares one POSIX shared-memory region with the server (host regions: the CPU backend, or
small tests on a GPU server), prefills three prompts in one batched Prefill per layer, decodes
a few steps (unary Decode, then the Stream with one request per layer in flight at once) and
compares every output with a float64 reference computed here.
"""

import argparse
import os
import sys

import numpy as np

import attnd_client as ac


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="unix:///tmp/attnd.sock")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    client = ac.Client(args.target, timeout=30)
    info = client.get_server_info()
    m = info.model
    dtype, layers, hq, hk, d = m.dtype, m.num_layers, m.num_qo_heads, m.num_kv_heads, m.head_dim
    scale = ac.model_sm_scale(m)
    tolerance = {ac.DTYPE_FLOAT32: 1e-4, ac.DTYPE_FLOAT16: 2e-3}.get(dtype, 1e-2)
    print(f"attnd {info.version}: {layers} layers, {hq}/{hk} heads x {d}, "
          f"{ac.dtype_name(dtype)}, page size {m.page_size}")

    prompts = [1, m.page_size + 1, 40]
    most = max(sum(prompts), len(prompts) * layers)
    es = ac.dtype_size(dtype)
    # One set of buffers per layer, so every layer's request can be in flight at once.
    sizing = ac.RegionAllocator(1 << 62)
    layout = {}
    for layer in range(layers):
        for name, heads in (("q", hq), ("k", hk), ("v", hk), ("out", hq)):
            layout[f"{name}{layer}"] = sizing.allocate(most * heads * d * es)
        layout[f"lse{layer}"] = sizing.allocate(most * hq * 4)

    region = f"py-example-{os.getpid()}"
    seq_ids = [int(rng.integers(1 << 40)) * 16 + i for i in range(len(prompts))]
    kv = {(s, layer): (np.zeros((0, hk, d), np.float32), np.zeros((0, hk, d), np.float32))
          for s in seq_ids for layer in range(layers)}
    worst = 0.0
    failures = 0

    with ac.SharedMemoryRegion(sizing.used) as shm:
        client.register_host_region(region, shm.key, 0, shm.size)

        def ref(name, rows, heads):
            return ac.tensor_ref(region, layout[name], dtype, [rows, heads, d])

        def stage(items, layer):
            """Fresh q/k/v for items in the region; the client's K/V copies grow."""
            t = sum(n for _, n in items)
            q = ac.round_to_dtype(rng.standard_normal((t, hq, d)), dtype)
            k = ac.round_to_dtype(rng.standard_normal((t, hk, d)), dtype)
            v = ac.round_to_dtype(rng.standard_normal((t, hk, d)), dtype)
            for name, values in (("q", q), ("k", k), ("v", v)):
                shm.write(layout[f"{name}{layer}"], dtype, values)
            shm.fill(layout[f"out{layer}"], t * hq * d * es, 0xFF)  # NaN: unwritten fails
            row = 0
            for s, n in items:
                old_k, old_v = kv[(s, layer)]
                kv[(s, layer)] = (np.concatenate([old_k, k[row:row + n]]),
                                  np.concatenate([old_v, v[row:row + n]]))
                row += n
            return q, ac.attention_request(
                args.device, layer, items, ref(f"q{layer}", t, hq), ref(f"k{layer}", t, hk),
                ref(f"v{layer}", t, hk),
                ref(f"out{layer}", t, hq),
                ac.tensor_ref(region, layout[f"lse{layer}"], ac.DTYPE_FLOAT32, [t, hq]))

        def check(what, items, layer, q, response):
            nonlocal worst, failures
            t = sum(n for _, n in items)
            out = shm.read(layout[f"out{layer}"], dtype, (t, hq, d))
            lse = shm.read(layout[f"lse{layer}"], ac.DTYPE_FLOAT32, (t, hq))
            row = 0
            for (s, n), length in zip(items, response.lengths):
                k, v = kv[(s, layer)]
                assert length == len(k), f"{what}: sequence {s} has length {length}, not {len(k)}"
                ref_out, ref_lse = ac.dense_attention_reference(
                    q[row:row + n], k, v, scale, m.logits_soft_cap, m.window_left)
                err = ac.relative_l2_error(out[row:row + n], ref_out)
                lse_err = float(np.max(np.abs(lse[row:row + n] - ref_lse)))
                worst = max(worst, err)
                if not (err <= tolerance and lse_err < 1e-2):
                    failures += 1
                    print(f"FAIL {what} seq {s}: rel err {err:.3g}, lse err {lse_err:.3g}")
                row += n

        try:
            for s in seq_ids:
                client.create_sequence(args.device, s)
            items = list(zip(seq_ids, prompts))
            for layer in range(layers):
                q, request = stage(items, layer)
                check(f"Prefill layer {layer}", items, layer, q, client.prefill(request))
            print(f"prefilled {len(prompts)} prompts {prompts} in one request per layer")

            decode_items = [(s, 1) for s in seq_ids]
            with client.open_stream() as stream:
                for step in range(args.steps):
                    if step % 2 == 0:  # unary, one layer after the other
                        for layer in range(layers):
                            q, request = stage(decode_items, layer)
                            check(f"Decode step {step} layer {layer}", decode_items, layer, q,
                                  client.decode(request))
                    else:  # Stream: every layer's request in flight, then the answers
                        staged = []
                        for layer in range(layers):
                            q, request = stage(decode_items, layer)
                            stream.send("decode", request)
                            staged.append((layer, q))
                        for layer, q in staged:
                            response = ac.DataStream.result(stream.receive())
                            check(f"Stream Decode step {step} layer {layer}", decode_items,
                                  layer, q, response)
            print(f"decoded {args.steps} steps; worst relative error {worst:.2e} "
                  f"(tolerance {tolerance:.0e})")
        finally:
            for s in seq_ids:
                try:
                    client.release_sequence(args.device, s)
                except ac.AttndError as error:
                    print(f"release {s}: {error}")
            client.unregister_region(region)
    client.close()
    print("example: PASS" if failures == 0 else f"example: FAIL ({failures} checks)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
