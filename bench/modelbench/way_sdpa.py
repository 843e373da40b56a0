"""(c): in-process torch SDPA over dense per-layer caches, the whole decode step one CUDA
graph (a stand-in for Transformers + SDPA with its StaticCache, without the mask)."""

import time

import torch
import torch.nn.functional as F

from .common import BF16, DEVICE, HEAD_DIM, KV, check_memory, log
from .timing import Result, busy_time, side_stream_warmup, time_steps


class WaySdpa:
    label = "(c) SDPA"

    def __init__(self, args, model, kv, pipe):
        self.args, self.model, self.kv, self.pipe = args, model, kv, pipe
        self.layers = model.layers
        self.max_batch = max(args.batches)
        n = args.context + 1
        per_layer = 2 * self.max_batch * KV * n * HEAD_DIM * 2
        if pipe.multi:
            for s, d in enumerate(pipe.devices):
                check_memory(f"{self.label} on {d}", len(pipe.layers_on(s)) * per_layer, d)
        else:
            check_memory(self.label, self.layers * per_layer)
        shape = (self.max_batch, KV, n, HEAD_DIM)
        self.kc = [torch.empty(shape, device=self.dev(i), dtype=BF16) for i in range(self.layers)]
        self.vc = [torch.empty(shape, device=self.dev(i), dtype=BF16) for i in range(self.layers)]
        t0 = time.perf_counter()
        ctx = args.context
        for layer in range(self.layers):
            for b in range(self.max_batch):
                blk = self.kv.block(layer, b)
                if pipe.multi:
                    blk = blk.to(self.dev(layer))
                self.kc[layer][b, :, :ctx] = blk[:, 0].transpose(0, 1)
                self.vc[layer][b, :, :ctx] = blk[:, 1].transpose(0, 1)
        pipe.synchronize()
        log(f"  (c) filled {self.max_batch} sequences in {time.perf_counter() - t0:.1f} s")

    def dev(self, layer):
        """Where layer's cache lives: DEVICE with one device, else its stage's device."""
        return self.pipe.device_of(layer) if self.pipe.multi else DEVICE

    def decode(self, batch, tokens, sleeper):
        a, m, pipe, ctx = self.args, self.model, self.pipe, self.args.context
        sts = pipe.statics(m, batch, tokens, [ctx] * batch, batch)

        def layer_fn(layer, st):
            m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
            kc, vc = self.kc[layer][:batch], self.vc[layer][:batch]
            kc[:, :, ctx].copy_(st.k)
            vc[:, :, ctx].copy_(st.v)
            o = F.scaled_dot_product_attention(st.q.unsqueeze(2), kc, vc, enable_gqa=True)
            m.post(layer, st.h, o)

        fns = pipe.stage_fns(m, sts, layer_fn)
        side_stream_warmup(pipe.chain(sts, fns))
        step, mode = pipe.graphed(sts, fns)
        r = Result()
        r.mode = mode
        r.step_ms = time_steps(step, a.warmup, a.steps)
        r.logits = sts[-1].logits.float().cpu()
        r.busy_ms = busy_time(sleeper, step, max(a.block_ms, 3 * r.step_ms), a.busy_reps)
        del step
        return r

    def prefill(self, tokens):
        a, m, pipe, L, n = self.args, self.model, self.pipe, self.layers, self.args.prefill
        sts = pipe.statics(m, n, tokens, list(range(n)), 1)
        kcs = [torch.empty(1, KV, n, HEAD_DIM, device=self.dev(i), dtype=BF16) for i in range(L)]
        vcs = [torch.empty_like(kc) for kc in kcs]

        def layer_fn(layer, st):
            m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
            kc, vc = kcs[layer], vcs[layer]
            kc[0].copy_(st.k.transpose(0, 1))
            vc[0].copy_(st.v.transpose(0, 1))
            o = F.scaled_dot_product_attention(st.q.transpose(0, 1).unsqueeze(0), kc, vc,
                                               is_causal=True, enable_gqa=True)
            st.attn.copy_(o[0].transpose(0, 1))
            m.post(layer, st.h, st.attn)

        r = Result()
        r.mode = "eager"
        r.step_ms = time_steps(pipe.chain(sts, pipe.stage_fns(m, sts, layer_fn)), 1,
                               a.prefill_reps)
        r.logits = sts[-1].logits.float().cpu()
        return r

    def close(self):
        self.kc = self.vc = None
