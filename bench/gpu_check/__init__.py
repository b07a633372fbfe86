"""GPU check of the cuda backend: one call on a bare lent GPU box, no network.

Run ``scripts/gpu_check.sh [--quick]`` (it installs the carried wheels of
``scripts/gpu_bundle.sh`` first); ``--dry-run`` sets up and runs every
section at toy sizes on the CPU under ``TRITON_INTERPRET=1``, which is how
the check is proven where no GPU is lent. Sections, each on its own (a
failure is reported and the next one runs), each closed by a ``SUMMARY``
line and a rewrite of ``$OUT/gpu_check.json`` (so a run killed at its time
limit still says what it measured):

(a) the kernel tests ``tests/backends/cuda`` natively (bf16, fp16, fp32);
(b) decode-attention bandwidth against the HBM peak at batch x context
    1x32k, 8x8k, 64x2k, 256x1k (each past the 60 MB L2; launches replayed
    from a CUDA graph so Python does not dominate);
(c) prefill-attention TFLOP/s;
(i) the W4A16/W8A16 GEMM's bandwidth at 8B decode shapes against the HBM
    peak and against bf16 ``torch.mm`` (``quant``);
(g) ``pagedgen serve --backend cuda`` answering a streamed Generate through
    the real client (a tiny random Llama directory built on the box);
then, on a Llama-3.1-8B-shaped model with random bf16 weights built on the
GPU (transformers' own model, whose tensors the backend shares), for each
``cuda_graph_mode``:
(d) start-up and graph capture time;
(e) teacher-forced logits against Hugging Face transformers and against
    mode ``none`` (top-1 agreement and max abs logit difference);
(f) offline throughput of 256 requests through the engine against HF
    ``generate()`` on the same GPU (``bench.hf_baseline``); once more, in
    ``plan.quant_mode``, with the projections and LM head quantized to 4
    bits on the GPU (``quant.quantize_model``), against the bf16 run;
(h) peak GPU memory against the budget ``--gpu-memory-utilization`` set.

Modules: ``plan`` (sizes of quick / full / dry-run), ``report`` (log lines,
summary, JSON), ``models`` (the random models), ``kernels`` (a-c),
``quant`` (i, the 4-bit weights), ``serving`` (g), ``modes`` (d-f, h). The
check runs from a checkout: it runs the test suite and builds its tokenizer
with ``tests.factories``.
"""
