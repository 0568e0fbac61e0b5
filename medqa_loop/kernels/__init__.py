"""The fast path: the same maths as transformers' and PEFT's modules, in fewer passes over memory
and with less kept for backward. Four layers, each knowing only the ones below it:

  patch.py       swaps the forwards of transformers' and PEFT's module instances (decoder.py:
                 a whole decoder layer's) for ...
  autograd.py    ... autograd functions (LoRA linear, int8 dequantized linear, RMSNorm, SwiGLU,
                 rotary, a layer's norm + projections, the loss head), whose small kernels come from ...
  ops.py         ... the one switch: Triton on CUDA where a kernel covers the tensors, else ...
  reference.py   ... the readable eager maths, which the CPU runs and the tests check the
                 Triton kernels (triton_ops.py) against.

attention.py is the packed-pair attention (FlashAttention varlen on CUDA, one SDPA per pair
elsewhere); seeds.py, each forward's LoRA dropout seeds, which the kernels read on the device.
``model.fused_ops``, ``model.int8_matmul`` and ``model.attn_implementation`` choose what is
patched in; with all three off the model is transformers' and PEFT's own.

graphs.py sits above them all: the loop's micro-batch (forward and backward of the patched
model) captured as CUDA graphs and replayed (``model.cuda_graphs``).
"""
