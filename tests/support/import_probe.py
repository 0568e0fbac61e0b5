"""A plugin that records being imported: it creates the file $MEDQA_IMPORT_PROBE names (the
``import_probe`` fixture, tests/conftest.py, sets it and imports this module afresh per test), so a
test can tell whether reading a config that names it ran it."""

import os
from pathlib import Path

from medqa_loop.masking import completion_only

Path(os.environ["MEDQA_IMPORT_PROBE"]).touch()

MASKED_ROWS: list[int] = []  # the rows the mask was called on
CALLS: list[int] = []  # the steps the hook was called at


def mask(ex):
    MASKED_ROWS.append(ex.row)
    return completion_only(ex)


def hook(step, model, batches):
    CALLS.append(step)
