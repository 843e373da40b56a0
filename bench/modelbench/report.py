"""The results: the markdown table of every configuration, the logit cross-check between the
ways, and the whole summary the bench prints (and writes with --md)."""

import torch


def rel_diff(x, ref):
    if x is None or ref is None:
        return None
    return ((x - ref).norm() / ref.norm()).item()


def fmt(x, nd=2, unit=""):
    return "–" if x is None else f"{x:.{nd}f}{unit}"


def ratio(x, y):
    return None if x is None or y is None else x / y


def table(args, results):
    lines = []
    lines.append("| config | (a) attnd ms | (b) FlashInfer ms | (c) SDPA ms | (a) tok/s | "
                 "(b) tok/s | (c) tok/s | (a)/(b) | (a)/(c) | (a) host µs/layer "
                 "(attention call) | (a) host ms/step | GPU busy ms (a)/(b)/(c) | "
                 "GPU idle (a) ms, µs/layer | idle (b)/(c) ms |")
    lines.append("|" + "---|" * 14)
    for b in list(args.batches) + (["prefill"] if args.prefill else []):
        ra, rb, rc = (results.get((n, b)) for n in "abc")
        tokens = b if b != "prefill" else args.prefill
        label = (f"decode B={b}, ctx {args.context}" if b != "prefill"
                 else f"prefill {args.prefill} tokens") + devices_note(args)

        def ms(r):
            return None if r is None else r.step_ms

        def tps(r):
            return None if r is None else tokens / r.step_ms * 1e3

        def idle(r):
            return None if r is None or r.busy_ms is None else r.step_ms - r.busy_ms

        ia = idle(ra)
        lines.append(
            f"| {label} | {fmt(ms(ra), 3)} | {fmt(ms(rb), 3)} | {fmt(ms(rc), 3)} | "
            f"{fmt(tps(ra), 0)} | {fmt(tps(rb), 0)} | {fmt(tps(rc), 0)} | "
            f"{fmt(ratio(ms(ra), ms(rb)))} | {fmt(ratio(ms(ra), ms(rc)))} | "
            f"{fmt(ra.host_layer_us if ra else None, 1)} "
            f"({fmt(ra.host_attn_us if ra else None, 1)}) | "
            f"{fmt(ra.host_step_ms if ra else None, 2)} | "
            f"{fmt(ra.busy_ms if ra else None, 3)} / {fmt(rb.busy_ms if rb else None, 3)} / "
            f"{fmt(rc.busy_ms if rc else None, 3)} | "
            f"{fmt(ia, 3)}, {fmt(None if ia is None else ia / args.layers * 1e3, 1)} | "
            f"{fmt(idle(rb), 3)} / {fmt(idle(rc), 3)} |")
    return lines


def cross_check(args, results):
    """(a) and (b) against (c) (or (a) against (b)): the same model, inputs and KV, so the
    logits may differ only by bf16 rounding."""
    lines, bad = [], []
    for b in list(args.batches) + (["prefill"] if args.prefill else []):
        ra, rb, rc = (results.get((n, b)) for n in "abc")
        ref = rc if rc is not None else rb
        pairs = [("a", ra), ("b", rb)] if ref is rc else [("a", ra)]
        for n, r in pairs:
            if r is None or ref is None:
                continue
            d = rel_diff(r.logits, ref.logits)
            finite = bool(torch.isfinite(r.logits).all())
            ok = finite and d is not None and d <= args.check_tol
            refname = "c" if ref is rc else "b"
            lines.append(f"  {b}: ({n}) vs ({refname}) logits relative L2 {d:.4g}"
                         + ("" if ok else "  <-- MISMATCH"))
            if not ok:
                bad.append(f"{b} ({n})")
    return lines, bad



def multi_device(args):
    """The Pipeline of a --devices run over several devices, else None."""
    pipe = getattr(args, "pipe", None)
    return pipe if pipe is not None and pipe.multi else None


def devices_note(args):
    """', cuda:0+1' after a configuration of a run over several devices; '' on one."""
    pipe = multi_device(args)
    return "" if pipe is None else ", cuda:" + "+".join(map(str, pipe.placement.devices))


def header(args, device_name, fi_version):
    """The lines above the table: what was measured, and how."""
    pipe = multi_device(args)
    if pipe is not None:
        graphs = args.layers + 1 + len(pipe.placement.boundaries())
        return [f"devices {device_name} (pipeline: each device runs its layers' weights, KV "
                f"and graphs; the hidden state is copied at each boundary); torch "
                f"{torch.__version__}; {args.layers} layers; context {args.context}; median of "
                f"{args.steps} steps after {args.warmup} warm-up; prefill median of "
                f"{args.prefill_reps}; GPU busy: median of {args.busy_reps} steps enqueued "
                f"behind a sleep kernel on the first device",
                f"(a) attnd via one AttndTorch per device, {graphs} piecewise CUDA graphs "
                f"(a piece across a boundary is one per device) + {args.layers} attnd calls "
                "per step; (b) FlashInfer not run (--devices splits (a) and (c) only); (c) "
                "in-process torch SDPA over dense per-layer caches, one CUDA graph per device "
                "per step; prefill eager", ""]
    return [f"device {device_name}; torch {torch.__version__}; flashinfer "
            f"{fi_version or 'not run'}; {args.layers} layers; context {args.context}; "
            f"median of {args.steps} steps after {args.warmup} warm-up; prefill median of "
            f"{args.prefill_reps}; GPU busy: median of {args.busy_reps} steps enqueued "
            f"behind a sleep kernel",
            f"(a) attnd via AttndTorch, {args.layers + 1} piecewise CUDA graphs + "
            f"{args.layers} attnd calls per step; "
            "(b) in-process FlashInfer paged (tensor cores), whole step one CUDA graph; "
            "(c) in-process torch SDPA over dense per-layer caches (stand-in for "
            "Transformers + SDPA + StaticCache, no mask), whole step one CUDA graph; "
            "prefill eager in all three", ""]


def summary(args, results, errors, device_name, fi_version):
    """(text, bad): the report's text, and the configurations whose logits disagree."""
    lines = header(args, device_name, fi_version) + table(args, results)
    checks, bad = cross_check(args, results)
    lines += ["", "logit cross-check (same weights, inputs and KV):"] + checks
    if errors:
        lines += ["", "not measured:"] + [f"  {e}" for e in errors]
    return "\n".join(lines) + "\n", bad
