"""(a): attention in attnd through attnd_client.torch.AttndTorch, the rest of each step as
piecewise CUDA graphs; and the attnd server the bench may start itself (--attnd-cmd)."""

import functools
import math
import os
import shlex
import signal
import statistics
import subprocess
import time

import torch

from .common import (GIB, HEAD_DIM, KV, PAGE, QO, SERVER_FLAGS, BenchError, log,
                     pages_for)
from .timing import Result, busy_time, capture, side_stream_warmup, time_steps


class WayAttnd:
    label = "(a) attnd"

    def __init__(self, args, model, kv, pipe):
        from attnd_client.native import NativeClient
        from attnd_client.torch import AttndTorch

        self.args, self.model, self.kv, self.pipe = args, model, kv, pipe
        self.layers = model.layers
        self.max_batch = max(args.batches)
        self.server = None
        self.ats = []  # one AttndTorch per stage (device) of the pipeline
        if args.attnd_cmd:
            self.server = Server(args.attnd_cmd, args.target, args.attnd_log)
        try:
            if self.server:
                self.server.start()
            info_client = NativeClient.connect(args.target, connect_timeout=10.0)
            try:
                self.info = info_client.server_info()
            finally:
                info_client.close()
            self.check_server()
            tokens = max(args.context, args.prefill, self.max_batch)
            for d in pipe.placement.devices:
                self.ats.append(AttndTorch.connect(args.target, device=d, max_tokens=tokens))
        except BaseException:
            for at in self.ats:
                at.close()
            if self.server:
                self.server.stop()
            raise
        base = (os.getpid() & 0xFFFF) << 32
        self.seq_ids = [base + i for i in range(self.max_batch)]
        self.prefill_seq = base + (1 << 24)
        self.created = []  # created on every device

    def check_server(self):
        import attnd_client as ac

        a, info, m = self.args, self.info, self.info.model
        need_pages = self.max_batch * pages_for(a.context + 1) + pages_for(a.prefill)
        devices = self.pipe.placement.devices
        served = {d.device: d for d in info.devices}
        problems = []
        if info.backend != ac.pb.BACKEND_CUDA:
            problems.append(f"backend {ac.pb.BackendKind.Name(info.backend)} (want cuda)")
        for name, have, want in (("num_qo_heads", m.num_qo_heads, QO),
                                 ("num_kv_heads", m.num_kv_heads, KV),
                                 ("head_dim", m.head_dim, HEAD_DIM),
                                 ("page_size", m.page_size, PAGE)):
            if have != want:
                problems.append(f"{name} {have} (want {want})")
        if m.num_layers < a.layers:
            problems.append(f"num_layers {m.num_layers} (want >= {a.layers})")
        if m.dtype != ac.DTYPE_BFLOAT16:
            problems.append(f"dtype {ac.dtype_name(m.dtype)} (want bf16)")
        if not math.isclose(ac.model_sm_scale(m), HEAD_DIM ** -0.5, rel_tol=1e-6):
            problems.append(f"sm_scale {m.sm_scale} (want the default)")
        if m.logits_soft_cap or m.window_left >= 0:
            problems.append("a soft cap or window (want neither)")
        for d in devices:  # every device holds every sequence (its own layers' K/V)
            if d not in served:
                problems.append(f"device {d} not served (attnd --devices)")
            elif served[d].free_pages < need_pages:
                problems.append(f"{served[d].free_pages} free pages of {served[d].total_pages} "
                                f"on device {d} (want >= {need_pages})")
        if info.max_batch_size < self.max_batch:
            problems.append(f"max_batch_size {info.max_batch_size} (want >= {self.max_batch})")
        if info.max_tokens_per_request < max(a.context, a.prefill):
            problems.append(f"max_tokens_per_request {info.max_tokens_per_request} "
                            f"(want >= {max(a.context, a.prefill)})")
        if info.max_seq_len < max(a.context + 1, a.prefill):
            problems.append(f"max_seq_len {info.max_seq_len}")
        if problems:
            flags = SERVER_FLAGS + (f" --devices={','.join(map(str, devices))}"
                                    if self.pipe.multi else "")
            raise BenchError("attnd at {} does not fit this bench: {}. Start it with {}".format(
                a.target, "; ".join(problems), flags))
        missing = [b for b in a.batches if b not in info.graph_buckets]
        dev = served[devices[0]]
        log(f"attnd {info.version}: {m.num_layers} layers, {m.num_qo_heads}/{m.num_kv_heads} "
            f"heads x {m.head_dim}, page {m.page_size}, "
            f"{ac.pb.KvLayout.Name(m.kv_layout)}, {dev.total_pages} pages "
            f"({dev.pool_bytes / GIB:.1f} GiB)"
            + (f" per device on {len(devices)} devices" if self.pipe.multi else "")
            + f", graph buckets "
            f"{list(info.graph_buckets)[:12]}{'...' if len(info.graph_buckets) > 12 else ''}")
        if missing:
            log(f"  note: batches {missing} have no attnd decode graph bucket (eager decode)")

    def fill(self):
        """Creates max(batches) sequences on every device, each holding the context at that
        device's layers (Append)."""
        pipe, ctx = self.pipe, self.args.context
        t0 = time.perf_counter()
        for b, s in enumerate(self.seq_ids):
            for at in self.ats:
                at.create_sequence(s)
            self.created.append(s)
            for stage, at in enumerate(self.ats):
                at.set_batch([s], [ctx])
                for layer in pipe.layers_on(stage):
                    blk = self.kv.block(layer, b)
                    if pipe.multi:
                        blk = blk.to(pipe.devices[stage])
                    at.append(layer, blk[:, 0], blk[:, 1])
        pipe.synchronize()
        for stage, at in enumerate(self.ats):
            layers = pipe.layers_on(stage)
            for s in (self.seq_ids[0], self.seq_ids[-1]):
                lengths = at.sequence_lengths(s)[layers.start:layers.stop]
                if any(n != ctx for n in lengths):
                    raise BenchError(f"sequence {s} holds {lengths} tokens at layers "
                                     f"{layers.start}-{layers.stop - 1} after the fill, want "
                                     f"{ctx}")
        log(f"  (a) filled {len(self.seq_ids)} sequences x {ctx} tokens x {self.layers} layers "
            f"in {time.perf_counter() - t0:.1f} s")

    def truncate(self, seqs, length):
        for at in self.ats:
            for s in seqs:
                at.truncate_sequence(s, length)

    def set_batch(self, seqs, counts):
        for at in self.ats:
            at.set_batch(seqs, counts)

    def pieces(self, sts, io):
        """The work between attention calls: pieces[i] runs before layer i's attention (i = L:
        after the last), as [(stage, fn)]: piece i is layer i-1's o_proj + residual + MLP (the
        embedding for i = 0) then layer i's norm + qkv + RoPE into AttndTorch's q/k_new/v_new
        (the final norm + LM head for i = L). A piece across a stage boundary is two parts,
        one per device. io[stage] = (q, k_new, v_new, out) of that stage's AttndTorch."""
        m, L, stage_of = self.model, self.layers, self.pipe.stage_of

        def part(i, s, first_half, second_half):
            st, (q, k, v, out) = sts[s], io[s]

            def fn():
                if first_half:
                    if i == 0:
                        m.head(st.ids, st.pos, st.h, st.freqs)
                    else:
                        m.post(i - 1, st.h, out)
                if second_half:
                    if i < L:
                        m.pre(i, st.h, st.freqs, q, k, v)
                    else:
                        st.tail(m)
            return fn

        pieces = []
        for i in range(L + 1):
            before = stage_of[i - 1] if i > 0 else 0
            after = stage_of[i] if i < L else self.pipe.last
            if before == after:
                pieces.append([(before, part(i, before, True, True))])
            else:
                pieces.append([(before, part(i, before, True, False)),
                               (after, part(i, after, False, True))])
        return pieces

    def joined(self, sts, parts, runs):
        """One function for a piece's parts: the run itself, or at a stage boundary the two
        runs with the hidden state moved between them."""
        if len(runs) == 1:
            return runs[0]
        (s0, _), (s1, _) = parts
        first, second = runs

        def both():
            first()
            self.pipe.move(sts[s0], sts[s1])
            second()
        return both

    def decode(self, batch, tokens, sleeper):
        a, m, pipe, L = self.args, self.model, self.pipe, self.layers
        seqs = self.seq_ids[:batch]
        sts = pipe.statics(m, batch, tokens, [a.context] * batch, batch)
        io = [(at.q[:batch], at.k_new[:batch], at.v_new[:batch], at.out[:batch])
              for at in self.ats]
        pieces = self.pieces(sts, io)
        calls = [functools.partial(self.ats[pipe.stage_of[i]].attention, i,
                                   *io[pipe.stage_of[i]][:3]) for i in range(L)]

        def set_batch():
            self.set_batch(seqs, [1] * batch)

        def untruncate():
            self.truncate(seqs, a.context)

        eager_pieces = [self.joined(sts, p, [fn for _, fn in p]) for p in pieces]

        def eager():
            for i in range(L + 1):
                eager_pieces[i]()
                if i < L:
                    o, out = calls[i](), io[pipe.stage_of[i]][3]
                    if o.data_ptr() != out.data_ptr() or o.shape != out.shape:
                        raise BenchError("AttndTorch.attention returned another buffer than "
                                         "AttndTorch.out[:T]; the piecewise graphs read that")
            pipe.join()

        set_batch()
        side_stream_warmup(eager)
        untruncate()
        if pipe.multi:
            pools = [torch.cuda.graph_pool_handle() for _ in pipe.devices]
            devs = pipe.devices
        else:
            pools, devs = [torch.cuda.graph_pool_handle()], [None]
        runs = [self.joined(sts, p, [capture(fn, pools[s], devs[s]).replay for s, fn in p])
                for p in pieces]
        host = []

        def step():
            pc = time.perf_counter
            for i in range(L):
                t0 = pc()
                runs[i]()
                t1 = pc()
                calls[i]()
                host.append((t1 - t0, pc() - t1))
            runs[L]()
            pipe.join()

        r = Result()
        graphs = sum(len(p) for p in pieces)
        r.mode = f"{graphs} graphs + {L} attnd calls" + (
            f" on {len(pipe.devices)} devices" if pipe.multi else "")
        r.step_ms = time_steps(step, a.warmup, a.steps, before=set_batch, after=untruncate)
        measured = host[-a.steps * L:]
        r.host_layer_us = statistics.median(x + y for x, y in measured) * 1e6
        r.host_attn_us = statistics.median(y for _, y in measured) * 1e6
        r.host_step_ms = statistics.median(
            sum(x + y for x, y in measured[j * L:(j + 1) * L]) for j in range(a.steps)) * 1e3
        r.logits = sts[-1].logits.float().cpu()
        r.busy_ms = busy_time(sleeper, step, max(a.block_ms, 3 * r.step_ms), a.busy_reps,
                              before=set_batch, after=untruncate)
        return r

    def prefill(self, tokens):
        a, m, pipe, n = self.args, self.model, self.pipe, self.args.prefill
        s = self.prefill_seq
        for at in self.ats:
            at.create_sequence(s)
        self.created.append(s)
        sts = pipe.statics(m, n, tokens, list(range(n)), 1)
        io = [(at.q[:n], at.k_new[:n], at.v_new[:n]) for at in self.ats]

        def layer_fn(layer, st):
            stage = pipe.stage_of[layer]
            q, k, v = io[stage]
            m.pre(layer, st.h, st.freqs, q, k, v)
            out = self.ats[stage].attention(layer, q, k, v)
            m.post(layer, st.h, out)

        r = Result()
        r.mode = "eager"
        r.step_ms = time_steps(pipe.chain(sts, pipe.stage_fns(m, sts, layer_fn)), 1,
                               a.prefill_reps, before=lambda: self.set_batch([s], [n]),
                               after=lambda: self.truncate([s], 0))
        r.logits = sts[-1].logits.float().cpu()
        return r

    def close(self):
        error = None
        for at in self.ats:  # every one closed; the first error raised at the end
            try:
                try:
                    for s in self.created:
                        at.release_sequence(s)
                finally:
                    at.close()
            except Exception as e:  # noqa: BLE001
                error = error or e
        if self.server:
            self.server.stop()
        if error is not None:
            raise error


class Server:
    """attnd started by the bench (--attnd-cmd), so it can be stopped before (b) and (c)."""

    def __init__(self, cmd, target, log_path):
        self.cmd, self.target, self.log_path = cmd, target, log_path
        self.proc = None

    def start(self, timeout_s=300):
        from attnd_client.native import NativeClient

        log(f"starting attnd: {self.cmd}  (log: {self.log_path})")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(shlex.split(self.cmd), stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"attnd exited with {self.proc.returncode} during start-up:\n"
                                 + self.tail())
            try:
                NativeClient.connect(self.target, connect_timeout=1.0).close()
                log(f"attnd answers after {time.time() - t0:.1f} s")
                return
            except Exception:  # noqa: BLE001 -- not up yet
                if time.time() - t0 > timeout_s:
                    raise BenchError(f"attnd did not answer at {self.target} within "
                                     f"{timeout_s} s:\n" + self.tail()) from None
                time.sleep(0.5)

    def tail(self, lines=30):
        self.log_file.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        log(f"attnd stopped (exit {rc})")
        self.log_file.close()
