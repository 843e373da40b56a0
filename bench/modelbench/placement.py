"""Which device runs which layers (--devices): the layers in contiguous, near-equal ranges, one
per listed device in the order listed (pipeline style); the first device also runs the embedding,
the last the final norm and LM head. Plain Python (no torch), so it is tested offline:

    python3 -m pytest bench/modelbench/test_placement.py
"""


def parse_devices(text):
    """'0,1' -> [0, 1]. ValueError for an empty list, a non-integer, a negative or a repeat."""
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        devices = [int(x) for x in parts]
    except ValueError:
        raise ValueError(f"--devices {text!r}: want comma-separated CUDA device indices, "
                         "e.g. 0,1") from None
    if not devices:
        raise ValueError("--devices: no device listed")
    if min(devices) < 0:
        raise ValueError(f"--devices {text!r}: device indices are >= 0")
    if len(set(devices)) != len(devices):
        raise ValueError(f"--devices {text!r} lists a device twice")
    return devices


def split_layers(num_layers, devices):
    """[(device, start, stop)]: layers start..stop-1 run on device, the ranges contiguous and in
    the order of `devices`; their sizes differ by at most one, earlier devices taking the extra
    layers (32 on 0,1: 0-15 and 16-31; 3 on 0,1: 0-1 and 2)."""
    devices = list(devices)
    if not devices:
        raise ValueError("no device to place the layers on")
    if num_layers < len(devices):
        raise ValueError(f"{num_layers} layers cannot be split over {len(devices)} devices "
                         "(at least one layer each)")
    base, extra = divmod(num_layers, len(devices))
    stages, start = [], 0
    for i, device in enumerate(devices):
        stop = start + base + (1 if i < extra else 0)
        stages.append((device, start, stop))
        start = stop
    return stages


class Placement:
    """The layers of a model of num_layers over `devices` (split_layers): stages[s] is
    (device, start, stop); stage_of[layer] is the index of the stage running that layer."""

    def __init__(self, num_layers, devices):
        self.devices = list(devices)
        self.num_layers = num_layers
        self.stages = split_layers(num_layers, self.devices)
        self.stage_of = [s for s, (_, start, stop) in enumerate(self.stages)
                         for _ in range(start, stop)]
        self.multi = len(self.devices) > 1

    def device_of(self, layer):
        return self.stages[self.stage_of[layer]][0]

    def boundaries(self):
        """The layers that start a stage other than the first (where the hidden state moves)."""
        return [start for _, start, _ in self.stages[1:]]

    def describe(self):
        """'cuda:0 layers 0-15, cuda:1 layers 16-31'."""
        return ", ".join(f"cuda:{d} layer{'s' if stop - start > 1 else ''} "
                         f"{start}{f'-{stop - 1}' if stop - start > 1 else ''}"
                         for d, start, stop in self.stages)
