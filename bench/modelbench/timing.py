"""CUDA-event timing of steps, CUDA-graph capture, and the GPU busy time measured with the
step enqueued behind a sleep kernel (see bench/model_bench.py's docstring)."""

import statistics
import time

import torch

from .common import log


def event():
    return torch.cuda.Event(enable_timing=True)


def side_stream_warmup(fn):
    """Runs fn once on a side stream (lazy initialisation before a capture), then joins."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()


_capture_streams = {}  # device -> the stream graphs of that device are captured on


def capture(fn, pool=None, device=None):
    """fn captured as a CUDA graph. device (a torch.device, for --devices): capture on that
    device, on a capture stream of its own (torch.cuda.graph's default capture stream is one
    stream, made on whichever device was current at its first use)."""
    if device is None:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn()
        return g
    with torch.cuda.device(device):
        stream = _capture_streams.get(device)
        if stream is None:
            stream = _capture_streams[device] = torch.cuda.Stream(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=stream):
            fn()
    return g


class Sleeper:
    """torch.cuda._sleep calibrated to milliseconds, to block a stream while the host
    enqueues a step behind it."""

    def __init__(self):
        self.cycles_per_ms = None
        if not hasattr(torch.cuda, "_sleep"):
            return
        torch.cuda.synchronize()
        a, b = event(), event()
        cycles = 20_000_000
        torch.cuda._sleep(cycles // 10)  # warm-up
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        self.cycles_per_ms = cycles / a.elapsed_time(b)

    def sleep(self, ms):
        torch.cuda._sleep(int(ms * self.cycles_per_ms))


def time_steps(run, warmup, steps, before=None, after=None):
    """Median ms of run() over `steps` steps after `warmup`, each timed alone with events;
    before()/after() run outside the timed region (host synchronised around each step)."""
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        if before:
            before()
        a, b = event(), event()
        a.record()
        run()
        b.record()
        b.synchronize()
        if after:
            after()
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def busy_time(sleeper, run, block_ms, reps, before=None, after=None):
    """Median ms of a step's GPU time with all of it enqueued behind a sleep (see the module
    docstring), or None when it cannot be measured."""
    if sleeper.cycles_per_ms is None:
        return None
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if before:
            before()
        s, a, b = event(), event(), event()
        s.record()
        sleeper.sleep(block_ms)
        a.record()
        t0 = time.perf_counter()
        run()
        host_ms = (time.perf_counter() - t0) * 1e3
        b.record()
        b.synchronize()
        if after:
            after()
        if host_ms < 0.9 * s.elapsed_time(a):
            samples.append(a.elapsed_time(b))
    return statistics.median(samples) if samples else None


class Result:
    def __init__(self):
        self.step_ms = None
        self.busy_ms = None
        self.mode = ""
        self.host_layer_us = None
        self.host_attn_us = None
        self.host_step_ms = None
        self.logits = None  # float32 on the CPU, for the cross-check


def graph_or_eager(run, device=None):
    """The whole step (or, with device, one device's part of it) as one CUDA graph (a replay
    function), or eager if capture fails."""
    try:
        g = capture(run, device=device)
        return g.replay, "one CUDA graph"
    except Exception as e:  # noqa: BLE001
        log(f"  graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eagerly")
        torch.cuda.synchronize(device)
        return run, "eager (capture failed)"
