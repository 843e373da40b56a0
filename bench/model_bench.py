#!/usr/bin/env python3
"""A Llama-3-8B-shaped decoder, attention three ways, measured in one run on one GPU (issue 10).

The model (random weights, bf16, written here in plain torch; no transformers): 32 layers,
hidden 4096, 32 query / 8 KV heads x 128, SwiGLU MLP 14336, vocab 128256, RMSNorm, RoPE (theta
500000, Llama's original complex form), embedding and LM head included. Per layer: RMSNorm ->
fused q/k/v projection -> RoPE -> attention (appending the new tokens' K/V first) -> o_proj +
residual -> RMSNorm -> gate/up projection -> SiLU x up -> down projection + residual. The same
weights and the same layer code serve the three ways; only attention and the KV cache differ:

  (a) attnd: attention in attnd through attnd_client.torch.AttndTorch (IPC events on torch's
      stream, pipelined Stream calls, no host synchronisation). Everything else runs as CUDA
      graphs in vLLM's piecewise style: one graph between consecutive attention calls (graph i =
      layer i-1's o_proj + residual + MLP, then layer i's norm + qkv + RoPE writing straight into
      AttndTorch's q/k_new/v_new buffers; graph 0 starts with the embedding, graph L ends with the
      final norm + LM head), 33 graph launches and 32 attnd calls per step. attnd and this
      process should run under MPS (`nvidia-cuda-mps-control -d` before both start); the script
      does not start MPS, it warns when it finds none.
  (b) in-process FlashInfer paged attention (flashinfer 0.6.x, imported lazily):
      append_paged_kv_cache + BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True,
      use_cuda_graph=True), one KV cache [pages, 2, 16, 8, 128] per layer (NHD, page 16, pages in
      random order), planned once per step outside the graph, the whole step one CUDA graph.
      Prefill: BatchPrefillWithPagedKVCacheWrapper(causal, backend --fi-prefill-backend).
  (c) in-process torch SDPA over dense per-layer caches [B, 8, L, 128] (new K/V written in
      place, F.scaled_dot_product_attention(enable_gqa=True), torch's own backend choice), the
      whole step one CUDA graph: a stand-in for Transformers + SDPA with its StaticCache,
      without the mask Transformers would add (so, if anything, faster than Transformers).

Measured: decode steps at each --batches size with --context tokens already in every sequence
(each step appends one token and attends over context + 1; attnd's sequences are truncated
back after each step, FlashInfer and SDPA rewrite the same slot), and one --prefill-token
prefill of a fresh sequence (eager in all three ways: at that size launches do not matter).
Every way holds the same KV contents (generated from the seed per layer and sequence), so their
logits must agree: the script compares (a) and (b) with (c) and fails (exit 3) above
--check-tol relative L2.

Reported per configuration:
  - step time: median of --steps steps after --warmup, each timed with CUDA events from the
    first enqueue to the end of the step (the host synchronises between steps; attnd's
    set_batch and FlashInfer's plan are done before the start event, truncation after the end);
  - tokens/s = batch / step time (prefill: tokens / prefill time);
  - (a)/(b), (a)/(c): ratios of step times;
  - host per layer (a): time.perf_counter() around each layer's enqueue (graph replay + the
    AttndTorch.attention call), median over layers and steps; and the attention call alone;
  - GPU idle: step time minus the step's GPU time with the host taken out of the loop. That GPU
    time ("busy") is measured separately: a torch.cuda._sleep kernel blocks the stream for
    --block-ms while the host enqueues the whole step behind it (for (a) attnd enqueues its work
    behind our IPC events too), so from the event after the sleep to the event after the step
    the GPU runs kernels back to back: the sum of the step's kernel times plus the device-side
    gaps no host can remove (graph launches, cross-process event waits). Idle is thus the time
    the GPU waited for the host. The same measurement of (b) and (c), whose steps are single
    graphs, checks the method (their idle should be ~0). A sample is discarded when the host
    took longer than the sleep.

Memory: the weights are ~15 GiB. KV at batch 128 x 4097 tokens x 32 layers is 64 GiB in each
way, so attnd's pool and (b)'s or (c)'s caches cannot all be on an H200 (141 GB) at once. With
--attnd-cmd the script starts attnd itself, runs (a), stops attnd (SIGTERM) and only then runs
(b) and (c), one after the other, freeing each before the next. Without it, --target must be a
running attnd, and (b)/(c) configurations that do not fit beside it are skipped with a message.

The attnd server this expects (checked against GetServerInfo; --layers may be fewer than the
server's layers): num_layers >= --layers, 32 qo / 8 kv heads, head_dim 128, bf16, page_size 16,
default sm_scale, no soft cap or window; pages for max(batches) x ceil((context+1)/16) + ceil(
prefill/16) pages free (128 x 257 + 256 = 33152; each page spans all 32 layers: 2 MiB, 65 GiB);
max_batch_size >= max(batches); max_tokens_per_request >= max(context, prefill):

  attnd --backend=cuda --num_layers=32 --num_qo_heads=32 --num_kv_heads=8 --head_dim=128
        --dtype=bf16 --page_size=16 --pages_per_device=33280 --max_batch_size=128
        --max_tokens_per_request=8192 --unix_socket=/tmp/attnd-model.sock --metrics_port=0

Run (GPU host; the command in bench/results/README-model.md):

  nvidia-cuda-mps-control -d
  python3 bench/model_bench.py --target unix:///tmp/attnd-model.sock \\
      --attnd-cmd ".device/gpu/run attnd <the flags above>" --md /tmp/model.md

Two GPUs (--devices 0,1): the layers split in contiguous halves, pipeline style (layers
0..L/2-1 on cuda:0 with the embedding, the rest on cuda:1 with the LM head): each layer's
weights, KV cache and graphs on its device, the hidden state (and RoPE factors) copied from
cuda:0 to cuda:1 at the boundary (eagerly, between graphs: a CUDA graph is of one device), and
in (a) one AttndTorch per device, each sequence created on both. Only (a) and (c) are split;
(b) FlashInfer is not run with several devices. attnd must serve both (--devices=0,1, with the
pages above on each device, since each holds every sequence for its layers):

  python3 bench/model_bench.py --devices 0,1 --ways ac --target unix:///tmp/attnd-model.sock \
      --attnd-cmd "attnd <the flags above> --devices=0,1" --md /tmp/model-2gpu.md

Quick run: --layers 4 --batches 1,16 --steps 20. Needs torch with CUDA, attnd_client (with its
native library) on PYTHONPATH, and for (b) flashinfer 0.6.x (--skip-flashinfer otherwise).
"""

import argparse
import gc
import os
import sys
import time
import traceback

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the package beside this script, however the script is started
    sys.path.insert(0, _HERE)

from modelbench.common import GIB, HEAD_DIM, HIDDEN, INTER, KV, QO, BenchError, log  # noqa: E402
from modelbench.model import KvSource, Model  # noqa: E402
from modelbench.pipeline import Pipeline  # noqa: E402
from modelbench.placement import parse_devices  # noqa: E402
from modelbench.report import fmt, summary  # noqa: E402
from modelbench.timing import Sleeper  # noqa: E402
from modelbench.way_attnd import WayAttnd  # noqa: E402
from modelbench.way_flashinfer import WayFlashInfer  # noqa: E402
from modelbench.way_sdpa import WaySdpa  # noqa: E402


def free_memory(pipe):
    gc.collect()  # the closures of a way's steps hold its graphs and buffers
    pipe.synchronize()
    torch.cuda.empty_cache()


def mps_status():
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def run_way(name, results, errors, make, batches, token_sets, prefill_tokens, sleeper, pipe):
    """Constructs one way, runs its decode configurations then its prefill, frees it."""
    way = None
    try:
        way = make()
        if way is None:
            return
        for b in batches:
            try:
                r = way.decode(b, token_sets[b], sleeper)
                results[(name, b)] = r
                log(f"  {way.label} batch {b}: {r.step_ms:.3f} ms/step "
                    f"({b / r.step_ms * 1e3:.0f} tok/s), busy {fmt(r.busy_ms, 3)} ms"
                    + (f", host {r.host_layer_us:.1f} µs/layer (attention call "
                       f"{r.host_attn_us:.1f} µs)" if r.host_layer_us is not None else "")
                    + f" [{r.mode}]")
            finally:
                free_memory(pipe)
        if prefill_tokens:
            r = way.prefill(prefill_tokens)
            results[(name, "prefill")] = r
            log(f"  {way.label} prefill {len(prefill_tokens)}: {r.step_ms:.2f} ms "
                f"({len(prefill_tokens) / r.step_ms * 1e3:.0f} tok/s) [{r.mode}]")
    except MemoryError as e:
        log(f"({name}) skipped: {e}")
        errors.append(f"({name}) skipped: {e}")
    except Exception as e:  # noqa: BLE001 -- report, keep the other ways' numbers
        log(f"({name}) FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
        errors.append(f"({name}) FAILED: {type(e).__name__}: {e}")
    finally:
        if way is not None:
            try:
                way.close()
            except Exception as e:  # noqa: BLE001
                log(f"({name}) FAILED while closing: {type(e).__name__}: {e}")
                errors.append(f"({name}) FAILED while closing: {e}")
        free_memory(pipe)



def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--target", default="unix:///tmp/attnd-model.sock")
    ap.add_argument("--attnd-cmd", default="",
                    help="command that starts attnd (split with shlex); the bench starts it "
                         "before (a) and stops it before (b) and (c)")
    ap.add_argument("--attnd-log", default="/tmp/attnd-model-bench.log")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=4096, help="prefill tokens; 0: none")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per config")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prefill-reps", type=int, default=10)
    ap.add_argument("--busy-reps", type=int, default=7,
                    help="steps timed behind a sleep kernel for the GPU busy time")
    ap.add_argument("--block-ms", type=float, default=30.0,
                    help="sleep that blocks the stream while a step is enqueued (at least 3x "
                         "the step time is used)")
    ap.add_argument("--ways", default="abc", help="which of a, b, c to run")
    ap.add_argument("--skip-flashinfer", action="store_true")
    ap.add_argument("--fi-prefill-backend", default="fa2",
                    help="FlashInfer prefill backend: fa2 (shares the JIT module of its "
                         "tensor-core decode), fa3 or auto (Hopper: fa3, a longer JIT)")
    ap.add_argument("--check-tol", type=float, default=0.1,
                    help="largest relative L2 difference of logits between ways (bf16 "
                         "rounding differences grow with depth: ~0.03 at 32 layers in a CPU "
                         "model of this kind; wrong KV or positions give ~0.5)")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--devices", default=None,
                    help="comma-separated CUDA devices the model's layers are split over in "
                         "contiguous, near-equal ranges (pipeline style: 0,1 runs layers "
                         "0..L/2-1 on cuda:0 and the rest on cuda:1, the hidden state copied "
                         "between them); weights, KV caches and graphs of each layer on its "
                         "device, and in (a) one AttndTorch per device (attnd must serve them "
                         "all: --devices=0,1 on attnd too). Splits (a) and (c) only: with more "
                         "than one device (b) FlashInfer is not run. Default: --device alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", default=None, help="also write the results (markdown) here")
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",") if x]
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches needs positive sizes")
    if args.layers < 1 or args.context < 1 or args.prefill < 0:
        ap.error("--layers and --context must be positive, --prefill non-negative")
    if args.steps < 20:
        log(f"note: --steps {args.steps} < 20; the issue asks for medians of at least 20")
    if args.skip_flashinfer:
        args.ways = args.ways.replace("b", "")
    try:
        args.devices = parse_devices(args.devices) if args.devices else [args.device]
        args.pipe = Pipeline(args.layers, args.devices)  # checks layers >= devices
    except ValueError as e:
        ap.error(str(e))
    args.device = args.devices[0]
    return args



def setup_device(args):
    """Selects the GPU (the first of --devices) and says what the run is; returns the name
    the report gives the device(s)."""
    if not torch.cuda.is_available():
        raise BenchError("no CUDA device")
    if max(args.devices) >= torch.cuda.device_count():
        raise BenchError(f"--devices {args.devices}: torch sees {torch.cuda.device_count()} "
                         "CUDA devices")
    torch.cuda.set_device(args.device)
    dev = torch.cuda.get_device_properties(args.device)
    log(f"device: {dev.name}, {dev.total_memory / GIB:.0f} GiB; torch {torch.__version__}; "
        f"MPS control pipe {'found' if mps_status() else 'NOT found'}")
    if args.pipe.multi:
        names = [torch.cuda.get_device_properties(d).name for d in args.devices]
        log(f"devices: {args.pipe.placement.describe()} ({', '.join(names)}); the hidden "
            "state is copied between them at the boundary")
        if "b" in args.ways:
            log("note: (b) FlashInfer is not split over devices; it is not run")
    if "a" in args.ways and not mps_status():
        log("warning: no MPS control daemon seen (nvidia-cuda-mps-control -d): (a) then pays a "
            "GPU context switch per call")
    log(f"model: {args.layers} layers, hidden {HIDDEN}, {QO}/{KV} heads x {HEAD_DIM}, MLP "
        f"{INTER}, vocab {args.vocab}, bf16; context {args.context}, batches {args.batches}, "
        f"prefill {args.prefill}; ways {args.ways}")
    if args.pipe.multi:
        return f"{dev.name} x {len(args.devices)}: {args.pipe.placement.describe()}"
    return dev.name


def make_inputs(args):
    """The weights, the context's K/V and the tokens of every configuration (from the seed)."""
    t0 = time.perf_counter()
    model = Model(args.layers, args.vocab, max(args.context + 1, args.prefill) + 1, args.seed,
                  args.pipe.layer_devices())
    args.pipe.synchronize()
    log(f"weights {model.weight_bytes() / GIB:.1f} GiB in {time.perf_counter() - t0:.1f} s")
    kv = KvSource(args.seed, args.context)
    g = torch.Generator().manual_seed(args.seed + 1)
    token_sets = {b: torch.randint(0, args.vocab, (b,), generator=g).tolist()
                  for b in args.batches}
    prefill_tokens = (torch.randint(0, args.vocab, (args.prefill,), generator=g).tolist()
                      if args.prefill else None)
    return model, kv, token_sets, prefill_tokens


def make_attnd(args, model, kv):
    w = WayAttnd(args, model, kv, args.pipe)
    try:
        w.fill()
    except BaseException:
        w.close()
        raise
    return w


def make_flashinfer(args, model, kv, errors, found):
    """(b), or None (said, and added to errors) when flashinfer does not import or build;
    found["version"] gets flashinfer's version once it imports."""
    try:
        import flashinfer as fi
        found["version"] = fi.__version__
    except Exception as e:  # noqa: BLE001
        log(f"(b) skipped: flashinfer does not import: {type(e).__name__}: {e}")
        errors.append("(b) skipped: flashinfer does not import")
        return None
    log(f"  flashinfer {found['version']} (kernels JIT-built on first use)")
    w = WayFlashInfer(args, model, kv, fi)  # MemoryError: skipped, said by run_way
    try:
        t = time.perf_counter()
        w.build_kernels()
        log(f"  FlashInfer kernels ready in {time.perf_counter() - t:.0f} s (JIT)")
    except Exception as e:  # noqa: BLE001
        w.close()
        log(f"(b) skipped: FlashInfer did not build or run its kernels: "
            f"{type(e).__name__}: {str(e)[:500]}")
        traceback.print_exc()
        errors.append(f"(b) skipped: FlashInfer did not build or run its kernels "
                      f"({type(e).__name__})")
        return None
    return w


def run_ways(args, model, kv, token_sets, prefill_tokens, sleeper):
    """Runs the ways of --ways one after the other; returns (results, errors, flashinfer's
    version or None)."""
    results, errors, found = {}, [], {"version": None}

    def run(name, make):
        run_way(name, results, errors, make, args.batches, token_sets, prefill_tokens, sleeper,
                args.pipe)

    if "a" in args.ways:
        log("\n(a) attention in attnd")
        run("a", lambda: make_attnd(args, model, kv))
    if "b" in args.ways and args.pipe.multi:
        errors.append(f"(b) not run: --devices {','.join(map(str, args.devices))} splits (a) "
                      "and (c) only")
    elif "b" in args.ways:
        log("\n(b) in-process FlashInfer")
        run("b", lambda: make_flashinfer(args, model, kv, errors, found))
    if "c" in args.ways:
        log("\n(c) in-process torch SDPA, dense caches")
        run("c", lambda: WaySdpa(args, model, kv, args.pipe))
    return results, errors, found["version"]


def main(argv=None):
    args = parse_args(argv)
    device_name = setup_device(args)
    model, kv, token_sets, prefill_tokens = make_inputs(args)
    sleeper = Sleeper()
    results, errors, fi_version = run_ways(args, model, kv, token_sets, prefill_tokens, sleeper)
    text, bad = summary(args, results, errors, device_name, fi_version)
    log("\n" + text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if bad:
        log(f"FAILED: logits of {', '.join(bad)} differ by more than --check-tol "
            f"{args.check_tol}: the numbers above are not of the same computation")
        return 3
    return 1 if any("FAILED" in e for e in errors) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"model_bench: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
