"""Constants of the model shape and the bench, and helpers shared by every module."""

import torch

HIDDEN, QO, KV, HEAD_DIM, INTER, PAGE = 4096, 32, 8, 128, 14336, 16
EPS, ROPE_THETA = 1e-5, 500000.0
BF16 = torch.bfloat16
GIB = 1 << 30
DEVICE = "cuda"  # where every tensor of the bench lives
SERVER_FLAGS = ("--backend=cuda --num_layers=32 --num_qo_heads=32 --num_kv_heads=8 "
                "--head_dim=128 --dtype=bf16 --page_size=16 --pages_per_device=33280 "
                "--max_batch_size=128 --max_tokens_per_request=8192")


class BenchError(Exception):
    """A condition under which the numbers would be wrong: the run stops with its message."""


def log(msg=""):
    print(msg, flush=True)


def pages_for(tokens):
    return (tokens + PAGE - 1) // PAGE


def check_memory(label, need_bytes, device=None):
    free, _ = torch.cuda.mem_get_info(device)
    if need_bytes + 3 * GIB > free:
        raise MemoryError(f"{label} needs {need_bytes / GIB:.1f} GiB of KV (+3 GiB margin), "
                          f"{free / GIB:.1f} GiB free: run with --attnd-cmd so attnd's pool is "
                          "gone by then")
