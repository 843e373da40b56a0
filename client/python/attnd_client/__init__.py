"""attnd_client: a Python client of attnd, the standalone attention server.

    import attnd_client as ac
    with ac.Client("unix:///tmp/attnd.sock") as client:
        info = client.get_server_info()

The native data path (libattnd_c.so through ctypes, no protobuf per call, the GIL released
while waiting) is NativeClient/NativeStream (attnd_client.native); PyTorch models use
attnd_client.torch.AttndTorch (needs torch; not imported here). Importing this package loads
no native library. See example.py and examples/ next to this package.
"""

from .client import (AttndError, Client, DataStream, append_request, attention_request,
                     batch_items, health_pb, pb)
from .native import Call, NativeClient, NativeLibraryError, NativeStream
from .shm import SharedMemoryRegion
from .tensors import (DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32, RegionAllocator,
                      bf16_bits_to_float, byte_size, decode, dense_attention_reference,
                      dtype_name, dtype_size, encode, float_to_bf16_bits, float_to_fp16_bits,
                      fp16_bits_to_float, model_sm_scale, relative_l2_error, round_to_dtype,
                      tensor_ref)

__all__ = [
    "AttndError", "Client", "DataStream", "NativeClient", "NativeStream", "Call",
    "NativeLibraryError", "SharedMemoryRegion", "RegionAllocator", "pb",
    "health_pb", "append_request", "attention_request", "batch_items", "tensor_ref",
    "byte_size", "dtype_size", "dtype_name", "encode", "decode", "round_to_dtype",
    "float_to_bf16_bits", "bf16_bits_to_float", "float_to_fp16_bits", "fp16_bits_to_float",
    "dense_attention_reference", "relative_l2_error", "model_sm_scale", "DTYPE_FLOAT16",
    "DTYPE_BFLOAT16", "DTYPE_FLOAT32",
]
