"""(c): in-process torch SDPA over dense per-layer caches, the whole decode step one CUDA
graph (a stand-in for Transformers + SDPA with its StaticCache, without the mask)."""

import time

import torch
import torch.nn.functional as F

from .common import BF16, DEVICE, HEAD_DIM, KV, check_memory, log
from .model import Statics
from .timing import Result, busy_time, graph_or_eager, side_stream_warmup, time_steps


class WaySdpa:
    label = "(c) SDPA"

    def __init__(self, args, model, kv):
        self.args, self.model, self.kv = args, model, kv
        self.layers = model.layers
        self.max_batch = max(args.batches)
        n = args.context + 1
        need = 2 * self.layers * self.max_batch * KV * n * HEAD_DIM * 2
        check_memory(self.label, need)
        shape = (self.max_batch, KV, n, HEAD_DIM)
        self.kc = [torch.empty(shape, device=DEVICE, dtype=BF16) for _ in range(self.layers)]
        self.vc = [torch.empty(shape, device=DEVICE, dtype=BF16) for _ in range(self.layers)]
        t0 = time.perf_counter()
        ctx = args.context
        for layer in range(self.layers):
            for b in range(self.max_batch):
                blk = self.kv.block(layer, b)
                self.kc[layer][b, :, :ctx] = blk[:, 0].transpose(0, 1)
                self.vc[layer][b, :, :ctx] = blk[:, 1].transpose(0, 1)
        torch.cuda.synchronize()
        log(f"  (c) filled {self.max_batch} sequences in {time.perf_counter() - t0:.1f} s")

    def decode(self, batch, tokens, sleeper):
        a, m, L, ctx = self.args, self.model, self.layers, self.args.context
        st = Statics(m, batch, tokens, [ctx] * batch, batch)

        def run():
            m.head(st.ids, st.pos, st.h, st.freqs)
            for layer in range(L):
                m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
                kc, vc = self.kc[layer][:batch], self.vc[layer][:batch]
                kc[:, :, ctx].copy_(st.k)
                vc[:, :, ctx].copy_(st.v)
                o = F.scaled_dot_product_attention(st.q.unsqueeze(2), kc, vc, enable_gqa=True)
                m.post(layer, st.h, o)
            st.tail(m)

        side_stream_warmup(run)
        step, mode = graph_or_eager(run)
        r = Result()
        r.mode = mode
        r.step_ms = time_steps(step, a.warmup, a.steps)
        r.logits = st.logits.float().cpu()
        r.busy_ms = busy_time(sleeper, step, max(a.block_ms, 3 * r.step_ms), a.busy_reps)
        del step
        return r

    def prefill(self, tokens):
        a, m, L, n = self.args, self.model, self.layers, self.args.prefill
        st = Statics(m, n, tokens, list(range(n)), 1)
        kcs = [torch.empty(1, KV, n, HEAD_DIM, device=DEVICE, dtype=BF16) for _ in range(L)]
        vcs = [torch.empty_like(kc) for kc in kcs]

        def run():
            m.head(st.ids, st.pos, st.h, st.freqs)
            for layer in range(L):
                m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
                kc, vc = kcs[layer], vcs[layer]
                kc[0].copy_(st.k.transpose(0, 1))
                vc[0].copy_(st.v.transpose(0, 1))
                o = F.scaled_dot_product_attention(st.q.transpose(0, 1).unsqueeze(0), kc, vc,
                                                   is_causal=True, enable_gqa=True)
                st.attn.copy_(o[0].transpose(0, 1))
                m.post(layer, st.h, st.attn)
            st.tail(m)

        r = Result()
        r.mode = "eager"
        r.step_ms = time_steps(run, 1, a.prefill_reps)
        r.logits = st.logits.float().cpu()
        return r

    def close(self):
        self.kc = self.vc = None
