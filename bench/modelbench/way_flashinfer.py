"""(b): in-process FlashInfer paged attention (flashinfer 0.6.x, passed in by the caller),
the whole decode step one CUDA graph."""

import time

import torch

from .common import BF16, DEVICE, HEAD_DIM, KV, PAGE, QO, check_memory, log, pages_for
from .model import Statics
from .timing import Result, busy_time, graph_or_eager, side_stream_warmup, time_steps


class WayFlashInfer:
    label = "(b) FlashInfer"

    def __init__(self, args, model, kv, fi):
        self.args, self.model, self.kv, self.fi = args, model, kv, fi
        self.layers = model.layers
        self.max_batch = max(args.batches)
        self.pages_per_seq = pages_for(args.context + 1)
        decode_pages = self.max_batch * self.pages_per_seq
        self.num_pages = decode_pages + pages_for(args.prefill)
        need = self.layers * self.num_pages * 2 * PAGE * KV * HEAD_DIM * 2
        check_memory(self.label, need)
        self.caches = [torch.empty(self.num_pages, 2, PAGE, KV, HEAD_DIM, device=DEVICE,
                                   dtype=BF16) for _ in range(self.layers)]
        g = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(decode_pages, generator=g).to(DEVICE, torch.int32)
        self.seq_pages = perm.view(self.max_batch, self.pages_per_seq)
        self.prefill_pages = torch.arange(decode_pages, self.num_pages, device=DEVICE,
                                          dtype=torch.int32)
        self.ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEVICE)
        t0 = time.perf_counter()
        ctx, p = args.context, self.pages_per_seq
        for layer in range(self.layers):
            for b in range(self.max_batch):
                blk = torch.zeros(p * PAGE, 2, KV, HEAD_DIM, device=DEVICE, dtype=BF16)
                blk[:ctx] = self.kv.block(layer, b)
                # [tokens, 2, kv, d] -> pages [p, 2, page, kv, d]
                pages = blk.view(p, PAGE, 2, KV, HEAD_DIM).transpose(1, 2).contiguous()
                self.caches[layer].index_copy_(0, self.seq_pages[b].long(), pages)
        torch.cuda.synchronize()
        log(f"  (b) filled {self.max_batch} sequences in {time.perf_counter() - t0:.1f} s")

    def build_kernels(self):
        """One eager call of each FlashInfer kernel used (decode, append, prefill), which
        JIT-builds them on first use: a failure here means (b) cannot run."""
        fi, p, ctx = self.fi, self.pages_per_seq, self.args.context
        q = torch.randn(1, QO, HEAD_DIM, device=DEVICE, dtype=BF16)
        k = torch.randn(1, KV, HEAD_DIM, device=DEVICE, dtype=BF16)
        indptr = torch.tensor([0, p], device=DEVICE, dtype=torch.int32)
        indices = self.seq_pages[0].contiguous()
        last = torch.tensor([ctx + 1 - (p - 1) * PAGE], device=DEVICE, dtype=torch.int32)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(self.ws, "NHD", use_tensor_cores=True)
        w.plan(indptr, indices, last, QO, KV, HEAD_DIM, PAGE, q_data_type=BF16,
               kv_data_type=BF16)
        # writes slot `context` of sequence 0 at layer 0, which every decode step rewrites
        fi.append_paged_kv_cache(k, k, torch.zeros(1, device=DEVICE, dtype=torch.int32),
                                 torch.full((1,), ctx, device=DEVICE, dtype=torch.int32),
                                 self.caches[0], indices, indptr, last, kv_layout="NHD")
        w.run(q, self.caches[0])
        if self.args.prefill:
            n = min(self.args.prefill, PAGE)
            wp = fi.BatchPrefillWithPagedKVCacheWrapper(self.ws, "NHD",
                                                        backend=self.args.fi_prefill_backend)
            wp.plan(torch.tensor([0, n], device=DEVICE, dtype=torch.int32),
                    torch.tensor([0, 1], device=DEVICE, dtype=torch.int32),
                    self.prefill_pages[:1].contiguous(),
                    torch.tensor([n], device=DEVICE, dtype=torch.int32), QO, KV, HEAD_DIM,
                    PAGE, causal=True, q_data_type=BF16, kv_data_type=BF16)
            wp.run(torch.randn(n, QO, HEAD_DIM, device=DEVICE, dtype=BF16), self.caches[0])
        torch.cuda.synchronize()

    def decode(self, batch, tokens, sleeper):
        a, m, fi, L, p = self.args, self.model, self.fi, self.layers, self.pages_per_seq
        st = Statics(m, batch, tokens, [a.context] * batch, batch)
        indptr = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * p
        indices = self.seq_pages[:batch].reshape(-1).contiguous()
        last = torch.full((batch,), a.context + 1 - (p - 1) * PAGE, device=DEVICE,
                          dtype=torch.int32)
        bufs = (torch.empty_like(indptr), torch.empty_like(indices), torch.empty_like(last))
        w = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.ws, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=bufs[0], paged_kv_indices_buffer=bufs[1],
            paged_kv_last_page_len_buffer=bufs[2])
        batch_idx = torch.arange(batch, device=DEVICE, dtype=torch.int32)
        positions = torch.full((batch,), a.context, device=DEVICE, dtype=torch.int32)

        def plan():
            w.plan(indptr, indices, last, QO, KV, HEAD_DIM, PAGE, q_data_type=BF16,
                   kv_data_type=BF16)

        def run():
            m.head(st.ids, st.pos, st.h, st.freqs)
            for layer in range(L):
                m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
                fi.append_paged_kv_cache(st.k, st.v, batch_idx, positions, self.caches[layer],
                                         bufs[1], bufs[0], bufs[2], kv_layout="NHD")
                w.run(st.q, self.caches[layer], out=st.attn)
                m.post(layer, st.h, st.attn)
            st.tail(m)

        plan()
        side_stream_warmup(run)
        step, mode = graph_or_eager(run)
        r = Result()
        r.mode = mode
        r.step_ms = time_steps(step, a.warmup, a.steps, before=plan)
        r.logits = st.logits.float().cpu()
        r.busy_ms = busy_time(sleeper, step, max(a.block_ms, 3 * r.step_ms), a.busy_reps,
                              before=plan)
        del step
        return r

    def prefill(self, tokens):
        a, m, fi, L, n = self.args, self.model, self.fi, self.layers, self.args.prefill
        st = Statics(m, n, tokens, list(range(n)), 1)
        pp = pages_for(n)
        w = fi.BatchPrefillWithPagedKVCacheWrapper(self.ws, "NHD",
                                                   backend=a.fi_prefill_backend)
        qo_indptr = torch.tensor([0, n], device=DEVICE, dtype=torch.int32)
        indptr = torch.tensor([0, pp], device=DEVICE, dtype=torch.int32)
        indices = self.prefill_pages[:pp].contiguous()
        last = torch.tensor([n - (pp - 1) * PAGE], device=DEVICE, dtype=torch.int32)
        batch_idx = torch.zeros(n, device=DEVICE, dtype=torch.int32)
        positions = torch.arange(n, device=DEVICE, dtype=torch.int32)
        w.plan(qo_indptr, indptr, indices, last, QO, KV, HEAD_DIM, PAGE, causal=True,
               q_data_type=BF16, kv_data_type=BF16)

        def run():
            m.head(st.ids, st.pos, st.h, st.freqs)
            for layer in range(L):
                m.pre(layer, st.h, st.freqs, st.q, st.k, st.v)
                fi.append_paged_kv_cache(st.k, st.v, batch_idx, positions, self.caches[layer],
                                         indices, indptr, last, kv_layout="NHD")
                w.run(st.q, self.caches[layer], out=st.attn)
                m.post(layer, st.h, st.attn)
            st.tail(m)

        r = Result()
        r.mode = f"eager, FlashInfer prefill backend {a.fi_prefill_backend}"
        r.step_ms = time_steps(run, 1, a.prefill_reps)
        r.logits = st.logits.float().cpu()
        return r

    def close(self):
        self.caches = None
        self.ws = None

