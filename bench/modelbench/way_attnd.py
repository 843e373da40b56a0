"""(a): attention in attnd through attnd_client.torch.AttndTorch, the rest of each step as
piecewise CUDA graphs; and the attnd server the bench may start itself (--attnd-cmd)."""

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
from .model import Statics
from .timing import Result, busy_time, capture, side_stream_warmup, time_steps


class WayAttnd:
    label = "(a) attnd"

    def __init__(self, args, model, kv):
        from attnd_client.native import NativeClient
        from attnd_client.torch import AttndTorch

        self.args, self.model, self.kv = args, model, kv
        self.layers = model.layers
        self.max_batch = max(args.batches)
        self.server = None
        self.at = None
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
            self.at = AttndTorch.connect(args.target, device=args.device, max_tokens=tokens)
        except BaseException:
            if self.server:
                self.server.stop()
            raise
        base = (os.getpid() & 0xFFFF) << 32
        self.seq_ids = [base + i for i in range(self.max_batch)]
        self.prefill_seq = base + (1 << 24)
        self.created = []

    def check_server(self):
        import attnd_client as ac

        a, info, m = self.args, self.info, self.info.model
        need_pages = self.max_batch * pages_for(a.context + 1) + pages_for(a.prefill)
        dev = [d for d in info.devices if d.device == a.device]
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
        if not dev:
            problems.append(f"device {a.device} not served")
        elif dev[0].free_pages < need_pages:
            problems.append(f"{dev[0].free_pages} free pages of {dev[0].total_pages} "
                            f"(want >= {need_pages})")
        if info.max_batch_size < self.max_batch:
            problems.append(f"max_batch_size {info.max_batch_size} (want >= {self.max_batch})")
        if info.max_tokens_per_request < max(a.context, a.prefill):
            problems.append(f"max_tokens_per_request {info.max_tokens_per_request} "
                            f"(want >= {max(a.context, a.prefill)})")
        if info.max_seq_len < max(a.context + 1, a.prefill):
            problems.append(f"max_seq_len {info.max_seq_len}")
        if problems:
            raise BenchError("attnd at {} does not fit this bench: {}. Start it with {}".format(
                a.target, "; ".join(problems), SERVER_FLAGS))
        missing = [b for b in a.batches if b not in info.graph_buckets]
        log(f"attnd {info.version}: {m.num_layers} layers, {m.num_qo_heads}/{m.num_kv_heads} "
            f"heads x {m.head_dim}, page {m.page_size}, "
            f"{ac.pb.KvLayout.Name(m.kv_layout)}, {dev[0].total_pages} pages "
            f"({dev[0].pool_bytes / GIB:.1f} GiB), graph buckets "
            f"{list(info.graph_buckets)[:12]}{'...' if len(info.graph_buckets) > 12 else ''}")
        if missing:
            log(f"  note: batches {missing} have no attnd decode graph bucket (eager decode)")

    def fill(self):
        """Creates max(batches) sequences holding the context at every layer (Append)."""
        at, ctx = self.at, self.args.context
        t0 = time.perf_counter()
        for b, s in enumerate(self.seq_ids):
            at.create_sequence(s)
            self.created.append(s)
            at.set_batch([s], [ctx])
            for layer in range(self.layers):
                blk = self.kv.block(layer, b)
                at.append(layer, blk[:, 0], blk[:, 1])
        torch.cuda.synchronize()
        for s in (self.seq_ids[0], self.seq_ids[-1]):
            lengths = at.sequence_lengths(s)
            if any(n != ctx for n in lengths[:self.layers]):
                raise BenchError(f"sequence {s} holds {lengths[:self.layers]} tokens after "
                                 f"the fill, want {ctx}")
        log(f"  (a) filled {len(self.seq_ids)} sequences x {ctx} tokens x {self.layers} layers "
            f"in {time.perf_counter() - t0:.1f} s")

    def truncate(self, seqs, length):
        for s in seqs:
            self.at.truncate_sequence(s, length)

    def decode(self, batch, tokens, sleeper):
        a, m, at, L = self.args, self.model, self.at, self.layers
        seqs = self.seq_ids[:batch]
        st = Statics(m, batch, tokens, [a.context] * batch, batch)
        q, k, v, out = at.q[:batch], at.k_new[:batch], at.v_new[:batch], at.out[:batch]

        def piece(i):
            if i == 0:
                m.head(st.ids, st.pos, st.h, st.freqs)
            else:
                m.post(i - 1, st.h, out)
            if i < L:
                m.pre(i, st.h, st.freqs, q, k, v)
            else:
                st.tail(m)

        def set_batch():
            at.set_batch(seqs, [1] * batch)

        def untruncate():
            self.truncate(seqs, a.context)

        def eager():
            for i in range(L + 1):
                piece(i)
                if i < L:
                    o = at.attention(i, q, k, v)
                    if o.data_ptr() != out.data_ptr() or o.shape != out.shape:
                        raise BenchError("AttndTorch.attention returned another buffer than "
                                         "AttndTorch.out[:T]; the piecewise graphs read that")

        set_batch()
        side_stream_warmup(eager)
        untruncate()
        pool = torch.cuda.graph_pool_handle()
        graphs = [capture(lambda i=i: piece(i), pool) for i in range(L + 1)]
        host = []

        def step():
            pc = time.perf_counter
            for i in range(L):
                t0 = pc()
                graphs[i].replay()
                t1 = pc()
                at.attention(i, q, k, v)
                host.append((t1 - t0, pc() - t1))
            graphs[L].replay()

        r = Result()
        r.mode = f"{L + 1} graphs + {L} attnd calls"
        r.step_ms = time_steps(step, a.warmup, a.steps, before=set_batch, after=untruncate)
        measured = host[-a.steps * L:]
        r.host_layer_us = statistics.median(x + y for x, y in measured) * 1e6
        r.host_attn_us = statistics.median(y for _, y in measured) * 1e6
        r.host_step_ms = statistics.median(
            sum(x + y for x, y in measured[j * L:(j + 1) * L]) for j in range(a.steps)) * 1e3
        r.logits = st.logits.float().cpu()
        r.busy_ms = busy_time(sleeper, step, max(a.block_ms, 3 * r.step_ms), a.busy_reps,
                              before=set_batch, after=untruncate)
        return r

    def prefill(self, tokens):
        a, m, at, L, n = self.args, self.model, self.at, self.layers, self.args.prefill
        s = self.prefill_seq
        at.create_sequence(s)
        self.created.append(s)
        st = Statics(m, n, tokens, list(range(n)), 1)
        q, k, v = at.q[:n], at.k_new[:n], at.v_new[:n]

        def run():
            m.head(st.ids, st.pos, st.h, st.freqs)
            for layer in range(L):
                m.pre(layer, st.h, st.freqs, q, k, v)
                out = at.attention(layer, q, k, v)
                m.post(layer, st.h, out)
            st.tail(m)

        r = Result()
        r.mode = "eager"
        r.step_ms = time_steps(run, 1, a.prefill_reps, before=lambda: at.set_batch([s], [n]),
                               after=lambda: self.truncate([s], 0))
        r.logits = st.logits.float().cpu()
        return r

    def close(self):
        try:
            if self.at is not None:
                for s in self.created:
                    self.at.release_sequence(s)
                self.at.close()
        finally:
            if self.server:
                self.server.stop()


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
