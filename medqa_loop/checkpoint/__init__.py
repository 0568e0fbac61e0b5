"""What a run writes to come back to, and how it is read back:

  adapter.py   adapters (``epoch-<n>/``, ``final/``): PEFT's layout, the base they belong to
  state.py     training states (``state/step-<n>/``): atomic, checked, restored by ``--resume``
  bundle.py    debug bundles (``debug/step-<n>/``): the state before a step, its window and
               gradients
  saved.py     the state before optimizer step N from any of the three, as replay reads it
  writer.py    the thread that writes adapters and states while training goes on
"""
