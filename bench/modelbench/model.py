"""The Llama-shaped model (random weights, RMSNorm, fused projections, RoPE, SwiGLU), the
context's K/V shared by every way, and the static buffers of one batch size."""

import torch
import torch.nn.functional as F

from .common import BF16, DEVICE, EPS, HEAD_DIM, HIDDEN, INTER, KV, QO, ROPE_THETA


class Model:
    """Random bf16 weights, initialised on the GPU from `seed`; std 1/sqrt(fan_in) keeps the
    activations of order one through all layers.

    layer_devices (--devices): the torch.device of each layer's weights; the embedding and RoPE
    table stay on the current device (the first), the final norm and LM head go to the last
    layer's. Every weight is drawn on the current device, in the same order whatever the
    placement, then moved: the same seed gives the same model on one device or several."""

    def __init__(self, layers, vocab, max_pos, seed, layer_devices=None):
        dev = torch.device(DEVICE)
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        at = layer_devices or [None] * layers  # None: stays where it is drawn
        home = [dev if d is None else d for d in at]

        def mat(rows, cols, to=None):
            w = torch.empty(rows, cols, device=dev, dtype=BF16)
            w = w.normal_(0.0, cols ** -0.5, generator=g)
            return w if to is None else w.to(to)  # the drawn copy is freed once moved

        self.layers = layers
        self.vocab = vocab
        self.embed = torch.empty(vocab, HIDDEN, device=dev, dtype=BF16).normal_(generator=g)
        self.wqkv = [mat((QO + 2 * KV) * HEAD_DIM, HIDDEN, at[i]) for i in range(layers)]
        self.wo = [mat(HIDDEN, QO * HEAD_DIM, at[i]) for i in range(layers)]
        self.wgu = [mat(2 * INTER, HIDDEN, at[i]) for i in range(layers)]
        self.wdown = [mat(HIDDEN, INTER, at[i]) for i in range(layers)]
        self.ln1 = [torch.ones(HIDDEN, device=home[i], dtype=BF16) for i in range(layers)]
        self.ln2 = [torch.ones(HIDDEN, device=home[i], dtype=BF16) for i in range(layers)]
        self.norm = torch.ones(HIDDEN, device=home[-1], dtype=BF16)
        self.lm_head = mat(vocab, HIDDEN, at[-1])
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device=dev,
                                                dtype=torch.float64) / HEAD_DIM)
        angles = torch.arange(max_pos, device=dev, dtype=torch.float64)[:, None] * inv[None]
        self.freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

    def weight_bytes(self):
        per_layer = sum(w.numel() for w in (self.wqkv[0], self.wo[0], self.wgu[0],
                                            self.wdown[0]))
        return 2 * (self.layers * per_layer + self.embed.numel() + self.lm_head.numel())

    # Pieces of a forward over T rows, on static buffers: h [T, hidden] (the residual stream,
    # updated in place), freqs [T, head_dim/2] complex, q [T, qo, d], k/v [T, kv, d].
    def head(self, ids, pos, h, freqs):
        torch.index_select(self.embed, 0, ids, out=h)
        torch.index_select(self.freqs, 0, pos, out=freqs)

    def pre(self, layer, h, freqs, q, k, v):
        t = h.shape[0]
        x = F.rms_norm(h, (HIDDEN,), self.ln1[layer], EPS)
        qkv = torch.mm(x, self.wqkv[layer].t())
        qk = qkv[:, :(QO + KV) * HEAD_DIM].to(torch.float32, memory_format=torch.contiguous_format)
        qk = qk.view(t, QO + KV, HEAD_DIM // 2, 2)
        qk = torch.view_as_real(torch.view_as_complex(qk) * freqs.unsqueeze(1))
        qk = qk.view(t, QO + KV, HEAD_DIM)
        q.copy_(qk[:, :QO])
        k.copy_(qk[:, QO:])
        v.copy_(qkv[:, (QO + KV) * HEAD_DIM:].view(t, KV, HEAD_DIM))

    def post(self, layer, h, attn):
        t = h.shape[0]
        h.addmm_(attn.reshape(t, QO * HEAD_DIM), self.wo[layer].t())
        x = F.rms_norm(h, (HIDDEN,), self.ln2[layer], EPS)
        gu = torch.mm(x, self.wgu[layer].t())
        h.addmm_(F.silu(gu[:, :INTER]) * gu[:, INTER:], self.wdown[layer].t())

    def tail(self, h, logits):
        torch.mm(F.rms_norm(h, (HIDDEN,), self.norm, EPS), self.lm_head.t(), out=logits)


class KvSource:
    """The context's K/V, the same in every way: block(layer, seq) is [tokens, 2, kv, d]
    (K then V), drawn from a generator seeded by (seed, layer, seq)."""

    def __init__(self, seed, tokens):
        self.seed = seed
        self.tokens = tokens
        self.g = torch.Generator(device=DEVICE)

    def block(self, layer, seq):
        self.g.manual_seed(self.seed * 1_000_003 + layer * 65_537 + seq)
        return torch.randn(self.tokens, 2, KV, HEAD_DIM, device=DEVICE, dtype=BF16,
                           generator=self.g)


class Statics:
    """The static buffers of one batch size (graph inputs and outputs)."""

    def __init__(self, model, rows, tokens, positions, logit_rows, device=DEVICE):
        self.ids = torch.tensor(tokens, device=device, dtype=torch.long)
        self.pos = torch.tensor(positions, device=device, dtype=torch.long)
        self.h = torch.empty(rows, HIDDEN, device=device, dtype=BF16)
        self.freqs = torch.empty(rows, HEAD_DIM // 2, device=device, dtype=torch.complex64)
        self.logits = torch.empty(logit_rows, model.vocab, device=device, dtype=BF16)
        self.q = torch.empty(rows, QO, HEAD_DIM, device=device, dtype=BF16)
        self.k = torch.empty(rows, KV, HEAD_DIM, device=device, dtype=BF16)
        self.v = torch.empty(rows, KV, HEAD_DIM, device=device, dtype=BF16)
        self.attn = torch.empty(rows, QO, HEAD_DIM, device=device, dtype=BF16)

    def tail(self, model):
        """Final norm + LM head of the last row only when logits has one row (prefill)."""
        h = self.h if self.logits.shape[0] == self.h.shape[0] else self.h[-1:]
        model.tail(h, self.logits)
