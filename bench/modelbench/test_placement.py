"""The layer placement of --devices, offline (no torch, no GPU):

    python3 -m pytest bench/modelbench/test_placement.py
"""

import pytest

from modelbench.placement import Placement, parse_devices, split_layers


def test_parse_devices_reads_a_comma_separated_list():
    assert parse_devices("0") == [0]
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices(" 1, 0 ,") == [1, 0]


@pytest.mark.parametrize("text", ["", ",", "a", "0,-1", "0,0", "1.5"])
def test_parse_devices_refuses_bad_lists(text):
    with pytest.raises(ValueError, match="--devices"):
        parse_devices(text)


def test_one_device_runs_every_layer():
    assert split_layers(32, [0]) == [(0, 0, 32)]
    p = Placement(32, [3])
    assert not p.multi and p.stage_of == [0] * 32 and p.boundaries() == []
    assert {p.device_of(layer) for layer in range(32)} == {3}
    assert p.describe() == "cuda:3 layers 0-31"


def test_two_devices_take_contiguous_halves():
    assert split_layers(32, [0, 1]) == [(0, 0, 16), (1, 16, 32)]
    p = Placement(32, [0, 1])
    assert p.multi and p.boundaries() == [16]
    assert [p.device_of(layer) for layer in range(32)] == [0] * 16 + [1] * 16
    assert p.stage_of == [0] * 16 + [1] * 16
    assert p.describe() == "cuda:0 layers 0-15, cuda:1 layers 16-31"


def test_uneven_splits_give_earlier_devices_the_extra_layer():
    assert split_layers(3, [0, 1]) == [(0, 0, 2), (1, 2, 3)]
    assert split_layers(7, [2, 0, 1]) == [(2, 0, 3), (0, 3, 5), (1, 5, 7)]
    assert Placement(2, [1, 0]).describe() == "cuda:1 layer 0, cuda:0 layer 1"


@pytest.mark.parametrize("layers", range(1, 40))
def test_every_layer_is_placed_once_in_order(layers):
    for n in range(1, min(layers, 8) + 1):
        stages = split_layers(layers, list(range(n)))
        covered = [layer for _, start, stop in stages for layer in range(start, stop)]
        assert covered == list(range(layers))
        sizes = [stop - start for _, start, stop in stages]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_more_devices_than_layers_is_refused():
    with pytest.raises(ValueError, match="cannot be split"):
        split_layers(1, [0, 1])
    with pytest.raises(ValueError):
        split_layers(4, [])
