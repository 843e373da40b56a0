"""attnd_client: a Python client of attnd, the standalone attention server.

    import attnd_client as ac
    with ac.Client("unix:///tmp/attnd.sock") as client:
        info = client.get_server_info()

See example.py next to this package for a whole prefill + decode round trip.
"""

from .client import (AttndError, Client, DataStream, append_request, attention_request,
                     batch_items, health_pb, pb)
from .shm import SharedMemoryRegion
from .tensors import (DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32, RegionAllocator,
                      bf16_bits_to_float, byte_size, decode, dense_attention_reference,
                      dtype_name, dtype_size, encode, float_to_bf16_bits, float_to_fp16_bits,
                      fp16_bits_to_float, model_sm_scale, relative_l2_error, round_to_dtype,
                      tensor_ref)

__all__ = [
    "AttndError", "Client", "DataStream", "SharedMemoryRegion", "RegionAllocator", "pb",
    "health_pb", "append_request", "attention_request", "batch_items", "tensor_ref",
    "byte_size", "dtype_size", "dtype_name", "encode", "decode", "round_to_dtype",
    "float_to_bf16_bits", "bf16_bits_to_float", "float_to_fp16_bits", "fp16_bits_to_float",
    "dense_attention_reference", "relative_l2_error", "model_sm_scale", "DTYPE_FLOAT16",
    "DTYPE_BFLOAT16", "DTYPE_FLOAT32",
]
