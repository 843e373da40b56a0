"""The model's layers over the devices of --devices, pipeline style (placement.py says which
layers run where): each stage's static buffers on its device, the hidden state (residual stream
and RoPE factors) copied to the next stage's buffers at a boundary, a step's work chained over
the stages, and the end of a step joined onto the first device's stream (where the timing events
are recorded). With one device all of it reduces to the single-device code: one Statics, no
copy, no join, the step function itself.

A CUDA graph is captured on one device: with several devices each stage's part of a step is a
graph of its own, and the copies between them run eagerly (torch orders a cross-device copy
with both devices' current streams). The first listed device is the current one throughout.
"""

import torch

from .model import Statics
from .placement import Placement
from .timing import graph_or_eager


class Pipeline:
    def __init__(self, num_layers, devices):
        self.placement = Placement(num_layers, devices)
        self.multi = self.placement.multi
        self.devices = [torch.device("cuda", d) for d in self.placement.devices]
        self.stages = self.placement.stages
        self.stage_of = self.placement.stage_of  # layer -> stage index
        self.last = len(self.stages) - 1

    def layer_devices(self):
        """Each layer's torch.device for Model, or None with one device (nothing moves)."""
        return [self.devices[s] for s in self.stage_of] if self.multi else None

    def device_of(self, layer):
        return self.devices[self.stage_of[layer]]

    def layers_on(self, stage):
        _, start, stop = self.stages[stage]
        return range(start, stop)

    def statics(self, model, rows, tokens, positions, logit_rows):
        """One Statics per stage, on its device (one device: the single-device Statics)."""
        if not self.multi:
            return [Statics(model, rows, tokens, positions, logit_rows)]
        return [Statics(model, rows, tokens, positions, logit_rows, device=d)
                for d in self.devices]

    @staticmethod
    def move(src, dst):
        """The hidden state from one stage's Statics to the next's (eager, cross-device)."""
        dst.h.copy_(src.h)
        dst.freqs.copy_(src.freqs)

    def join(self):
        """The first device's current stream waits for every other device's: the end of a
        step, so an event recorded after it on the first device times the whole step."""
        if not self.multi:
            return
        first = torch.cuda.current_stream(self.devices[0])
        for d in self.devices[1:]:
            first.wait_stream(torch.cuda.current_stream(d))

    def synchronize(self):
        """Every device of the placement (one device: torch.cuda.synchronize(), as ever)."""
        if not self.multi:
            torch.cuda.synchronize()
            return
        for d in self.devices:
            torch.cuda.synchronize(d)

    def stage_fns(self, model, sts, layer_fn):
        """One function per stage running its layers, layer_fn(layer, statics) each; the
        first stage starts with the embedding, the last ends with the final norm + LM head."""
        fns = []
        for s in range(len(self.stages)):
            def fn(s=s):
                st = sts[s]
                if s == 0:
                    model.head(st.ids, st.pos, st.h, st.freqs)
                for layer in self.layers_on(s):
                    layer_fn(layer, st)
                if s == self.last:
                    st.tail(model)
            fns.append(fn)
        return fns

    def chain(self, sts, runs):
        """One step from one function per stage: each in turn, the hidden state moved to the
        next stage's buffers between them, then the join. One stage: its function itself."""
        if not self.multi:
            return runs[0]

        def step():
            for s, run in enumerate(runs):
                if s:
                    self.move(sts[s - 1], sts[s])
                run()
            self.join()
        return step

    def graphed(self, sts, fns):
        """(step, mode): each stage's function captured as a CUDA graph on its device (eager
        where capture fails), chained. One device: graph_or_eager of the whole step, as ever."""
        if not self.multi:
            return graph_or_eager(fns[0])
        runs, modes = [], []
        for d, fn in zip(self.devices, fns):
            run, mode = graph_or_eager(fn, device=d)
            runs.append(run)
            modes.append(f"cuda:{d.index} {mode}")
        return self.chain(sts, runs), ", ".join(modes) + ", hidden state copied between"
