"""The pieces of bench/model_bench.py (a Llama-3-8B-shaped decoder, attention in attnd vs
in-process FlashInfer vs torch SDPA): the model, CUDA-event timing, the three ways and the
report. bench/model_bench.py is the entry point; its docstring describes the method."""
