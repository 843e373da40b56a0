"""attnd as a Transformers attention backend: the model's KV lives in attnd, not in a Cache.

    from attnd_client.torch import AttndTorch
    from attnd_client import transformers_backend as tb

    at = AttndTorch.connect("unix:///tmp/attnd.sock")
    tb.register(at)                                   # AttentionInterface name "attnd"
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                             attn_implementation="attnd").cuda()
    new_tokens = tb.generate_greedy(model, at, [prompt_ids, ...], max_new_tokens=32)

Any model that calls attention through `transformers.AttentionInterface` (Llama, Mistral,
Qwen2, ...) works, provided its shape matches the attnd server's (layers, query and KV heads,
head_dim, dtype, the logits scale) and it needs nothing attnd does not do (no attention
dropout, no sliding window or soft cap other than the server's).

How a forward maps onto attnd. The model runs with `use_cache=False`: attnd holds every
sequence's KV, so the K/V the attention function receives are only the new tokens' (after RoPE,
which the model applied before calling attention). Every forward runs inside
`with batch(at, seq_ids, new_counts):`, which sets attnd's per-step batch once; each attention
layer then reshapes q/k/v from [B, heads, S, d] to rows [T, heads, d] in batch order (T = B*S)
and calls `at.attention(module.layer_idx, q, k, v)`, which appends K/V to each sequence at that
layer and attends the new tokens causally over the sequence's whole history. Two input shapes
are accepted: B sequences with S new tokens each (a decode step has S = 1), or B = 1 with the
tokens of several sequences packed along S (ragged prefill; `new_counts` says where each
sequence's rows end; position_ids restart for each sequence). `attention_mask` is ignored:
attnd applies causality over each sequence's own history, and the batch has no padding.

Everything stays on torch's current stream (AttndTorch orders its calls with IPC events), so
a forward makes no host-GPU synchronisation of its own.
"""

import contextlib
import math
import secrets
import warnings

import torch

__all__ = ["register", "batch", "generate_greedy", "AttndAttention"]

# AttndTorch instances registered here, by id: id -> AttndAttention (which holds the instance,
# so the id stays valid while registered).
_REGISTERED = {}


class _Batch:
    __slots__ = ("seq_ids", "counts", "total", "layers_done")

    def __init__(self, seq_ids, counts):
        self.seq_ids = seq_ids
        self.counts = counts
        self.total = sum(counts)
        self.layers_done = set()


def _model_field(model, key, default=None):
    if isinstance(model, dict):
        return model.get(key, default)
    return getattr(model, key, default)


class AttndAttention:
    """The attention function registered with transformers.AttentionInterface for one
    AttndTorch. Called by the model as fn(module, query, key, value, attention_mask, scaling=,
    dropout=, **kwargs) with query [B, qo_heads, S, d] and key/value [B, kv_heads, S, d];
    returns (attn_output [B, S, qo_heads, d], None)."""

    def __init__(self, at):
        self.at = at
        m = at.model
        self.num_layers = int(_model_field(m, "num_layers"))
        self.num_qo_heads = int(_model_field(m, "num_qo_heads"))
        self.num_kv_heads = int(_model_field(m, "num_kv_heads"))
        self.head_dim = int(_model_field(m, "head_dim"))
        self.dtype = _model_field(m, "dtype")
        scale = _model_field(m, "sm_scale", 0.0) or 0.0
        # The server's sm_scale; 0 (or absent) means its default, 1/sqrt(head_dim).
        self.sm_scale = float(scale) if scale > 0 else 1.0 / math.sqrt(self.head_dim)
        self.logits_soft_cap = float(_model_field(m, "logits_soft_cap", 0.0) or 0.0)
        window = _model_field(m, "window_left", None)
        self.window_left = -1 if window is None else int(window)
        self.current = None  # the _Batch of the `with batch(...)` in progress

    def _check_model_options(self, module, scaling, dropout, kwargs):
        if dropout:
            raise ValueError(f"attnd does no attention dropout (got dropout={dropout}); "
                             "call model.eval()")
        if scaling is None:
            scaling = 1.0 / math.sqrt(self.head_dim)
        if not math.isclose(float(scaling), self.sm_scale, rel_tol=1e-5, abs_tol=1e-9):
            raise ValueError(f"the model scales attention logits by {scaling}, the attnd server "
                             f"by {self.sm_scale}: start attnd with --sm_scale={scaling}")
        cap = kwargs.get("softcap") or getattr(module, "attn_logit_softcapping", None) or 0.0
        if not math.isclose(float(cap), self.logits_soft_cap, rel_tol=1e-6, abs_tol=0.0):
            raise ValueError(f"the model soft-caps logits at {cap}, the attnd server at "
                             f"{self.logits_soft_cap} (--logits_soft_cap)")
        # Transformers' sliding_window W lets a query see the last W keys, itself included:
        # attnd's window_left = W - 1.
        window = kwargs.get("sliding_window", None)
        if window is None:
            window = getattr(module, "sliding_window", None)
        want = int(window) - 1 if window else -1
        if want != self.window_left:
            raise ValueError(f"layer {module.layer_idx} attends a window of {window} keys; the "
                             f"attnd server has window_left={self.window_left} (--window_left)")

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None,
                 dropout=0.0, **kwargs):
        b = self.current
        if b is None:
            raise RuntimeError("attnd attention called outside `with batch(at, seq_ids, "
                               "new_counts):`; generate_greedy() does this for you")
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"{type(module).__name__} has no layer_idx")
        layer = int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer}: the attnd server holds {self.num_layers} layers "
                             "(--num_layers)")
        if layer in b.layers_done:
            raise RuntimeError(f"layer {layer} called twice in one batch: each call appends the "
                               "new tokens' K/V, so every forward needs its own `with batch()`")
        self._check_model_options(module, scaling, dropout, kwargs)

        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise ValueError(f"expected 4-D query/key/value, got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        bsz, heads, s, d = query.shape
        kb, kv_heads, ks, kd = key.shape
        if ks != s or kb != bsz or tuple(value.shape) != tuple(key.shape):
            raise ValueError(f"key/value {tuple(key.shape)} do not match the query's {s} new "
                             "tokens: run the model with use_cache=False (attnd holds the KV)")
        if (heads, kv_heads, d, kd) != (self.num_qo_heads, self.num_kv_heads, self.head_dim,
                                        self.head_dim):
            raise ValueError(f"model: {heads} query / {kv_heads} kv heads x {d}; attnd server: "
                             f"{self.num_qo_heads} / {self.num_kv_heads} x {self.head_dim}")
        if self.dtype is not None and query.dtype != self.dtype:
            raise ValueError(f"model dtype {query.dtype}, attnd server {self.dtype}")
        t = bsz * s
        if t != b.total:
            raise ValueError(f"the forward has {bsz} x {s} = {t} new tokens, the batch "
                             f"{b.total} ({len(b.counts)} sequences)")
        if bsz > 1 and (bsz != len(b.counts) or any(c != s for c in b.counts)):
            raise ValueError(f"a [B={bsz}, S={s}] forward needs {bsz} sequences of {s} new "
                             f"tokens each, the batch has {b.counts}; pack ragged batches as "
                             "B=1")
        # Rows in batch order: sequence i's S tokens, then sequence i+1's. After RoPE the
        # [B, H, S, d] tensors are usually [B, S, H, d] in memory, so these are views.
        q = query.transpose(1, 2).reshape(t, heads, d)
        k = key.transpose(1, 2).reshape(t, kv_heads, d)
        v = value.transpose(1, 2).reshape(t, kv_heads, d)
        out = self.at.attention(layer, q, k, v)
        b.layers_done.add(layer)  # appended: a failed step rolls this layer back
        # `out` stays valid until the next attnd call; the model's o_proj reads it on the current
        # stream before that call is enqueued, and attnd waits for the stream at every call.
        return out.view(bsz, s, heads, d), None


def register(at, name="attnd"):
    """Registers attention through `at` (an AttndTorch) with transformers.AttentionInterface
    under `name`; select it with attn_implementation=name at load or
    model.set_attn_implementation(name). Returns the registered AttndAttention."""
    from transformers import AttentionInterface

    fn = _REGISTERED.get(id(at))
    if fn is None or fn.at is not at:
        fn = AttndAttention(at)
        _REGISTERED[id(at)] = fn
    AttentionInterface.register(name, fn)
    return fn


def _attention_for(at):
    fn = _REGISTERED.get(id(at))
    if fn is None or fn.at is not at:
        raise RuntimeError("call transformers_backend.register(at) before batch(at, ...)")
    return fn


def _roll_back(at, b):
    """After a failed forward, undoes the step: every layer that appended the new tokens goes
    back to its length before (a layer's length minus the sequence's new tokens; layers the
    step did not reach already have that length or less, and truncation keeps them)."""
    if not b.layers_done:
        return
    for seq_id, count in zip(b.seq_ids, b.counts):
        try:
            lengths = at.sequence_lengths(seq_id)
            at.truncate_sequence(seq_id, min(lengths[i] for i in b.layers_done) - count)
        except Exception as e:  # noqa: BLE001 -- best effort; the original error propagates
            warnings.warn(f"attnd: could not roll back sequence {seq_id}: {e}")


@contextlib.contextmanager
def batch(at, seq_ids, new_counts):
    """The per-step batch: sets it on attnd once (at.set_batch), then every attention layer of
    the forward inside the block uses it. Rows of the forward's tokens are in this order."""
    fn = _attention_for(at)
    seq_ids = [int(s) for s in seq_ids]
    new_counts = [int(n) for n in new_counts]
    if len(seq_ids) != len(new_counts) or not seq_ids:
        raise ValueError(f"{len(seq_ids)} seq_ids, {len(new_counts)} new_counts")
    if any(n <= 0 for n in new_counts):
        raise ValueError(f"new_counts must be positive: {new_counts}")
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError("a sequence appears twice in one batch")
    if fn.current is not None:
        raise RuntimeError("batch() blocks do not nest")
    at.set_batch(seq_ids, new_counts)
    fn.current = b = _Batch(seq_ids, new_counts)
    try:
        yield b
    except BaseException:
        _roll_back(at, b)
        raise
    finally:
        fn.current = None


def _forward_logits(model, input_ids, position_ids, keep):
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                logits_to_keep=keep)
    return out.logits


@torch.no_grad()
def generate_greedy(model, at, prompts, max_new_tokens, *, seq_ids=None, release=True,
                    return_logits=False, eos_token_id=None, prefill_tokens=None):
    """Greedy generation with the KV in attnd: `model` uses attn_implementation registered by
    register(at). Prompts (lists of token ids) are prefilled in packed B=1 forwards of at most
    `prefill_tokens` tokens (default: at.max_tokens, or 4096; long prompts in chunks), position
    ids from 0; then batched decode steps of one token per live sequence, position ids = the
    sequence's current length.

    Returns the new tokens of each prompt (max_new_tokens each, fewer where eos_token_id came
    first); with return_logits=True, (tokens, logits) where logits[i] is
    [len(prompts[i]) + len(tokens[i]) - 1, vocab]: row j is the model's prediction after token j
    of prompt + new tokens. Sequences are created in attnd (ids: `seq_ids`, or fresh random ones)
    and released at the end unless release=False.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    _attention_for(at)
    device = next(model.parameters()).device
    budget = int(prefill_tokens or getattr(at, "max_tokens", 0) or 4096)
    if seq_ids is None:
        base = secrets.randbits(40) << 16
        seq_ids = [base + i for i in range(len(prompts))]
    seq_ids = [int(s) for s in seq_ids]
    if len(seq_ids) != len(prompts):
        raise ValueError(f"{len(seq_ids)} seq_ids for {len(prompts)} prompts")

    created = []
    try:
        for s in seq_ids:
            at.create_sequence(s)
            created.append(s)
        lengths = [0] * len(prompts)
        logits = [[] for _ in prompts]
        last = [None] * len(prompts)  # logits row predicting each sequence's next token

        # Prefill: pieces (prompt, start, end) of <= budget tokens, packed into B=1 forwards of
        # <= budget tokens (a prompt's later chunk always lands in a later forward).
        steps, used = [[]], 0
        for i, p in enumerate(prompts):
            for start in range(0, len(p), budget):
                end = min(len(p), start + budget)
                if steps[-1] and used + end - start > budget:
                    steps.append([])
                    used = 0
                steps[-1].append((i, start, end))
                used += end - start
        for step in steps:
            ids = [t for i, s, e in step for t in prompts[i][s:e]]
            pos = [j for _, s, e in step for j in range(s, e)]
            ends = [sum(e - s for _, s, e in step[:k + 1]) - 1 for k in range(len(step))]
            keep = 0 if return_logits else torch.tensor(ends, device=device)
            with batch(at, [seq_ids[i] for i, _, _ in step], [e - s for _, s, e in step]):
                out = _forward_logits(model, torch.tensor([ids], device=device),
                                      torch.tensor([pos], device=device), keep)[0]
            row = 0
            for k, (i, s, e) in enumerate(step):
                if return_logits:
                    rows = out[row:row + e - s]
                    logits[i].append(rows)
                else:
                    rows = out[k:k + 1]
                row += e - s
                lengths[i] = e
                if e == len(prompts[i]):
                    last[i] = rows[-1]

        tokens = [[int(torch.argmax(last[i]))] for i in range(len(prompts))]
        live = [i for i in range(len(prompts)) if tokens[i][-1] != eos_token_id]
        for _ in range(max_new_tokens - 1):
            if not live:
                break
            ids = torch.tensor([[tokens[i][-1]] for i in live], device=device)
            pos = torch.tensor([[lengths[i]] for i in live], device=device)
            with batch(at, [seq_ids[i] for i in live], [1] * len(live)):
                out = _forward_logits(model, ids, pos, 1)[:, -1]
            nxt = torch.argmax(out, dim=-1).tolist()
            for k, i in enumerate(live):
                lengths[i] += 1
                tokens[i].append(int(nxt[k]))
                if return_logits:
                    logits[i].append(out[k:k + 1])
            live = [i for i in live if tokens[i][-1] != eos_token_id]
    finally:
        if release:
            for s in created:
                try:
                    at.release_sequence(s)
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"attnd: could not release sequence {s}: {e}")
    if return_logits:
        return tokens, [torch.cat(rows, dim=0) for rows in logits]
    return tokens
