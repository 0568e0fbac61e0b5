"""Tools for seeing what training does to the gradients, and where its time goes:

  trace.py       the gradient debugger (``debug.*``): per-step trace of every LoRA matrix,
                 per-micro-batch attribution, the NaN/inf guard, pause hooks, snapshots
  int8.py        LLM.int8's outlier columns per 8-bit layer
  replay.py      ``medqa replay``: recompute one step from a checkpoint, bitwise on the CPU
  selftest.py    ``medqa selftest``: gradient accumulation equals one batch?
  plot.py        ``medqa plot``: a run's curves
  profiling.py   ``train.profile_steps``: torch.profiler around chosen steps
"""
