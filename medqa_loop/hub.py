"""The model and dataset hub: one question at start-up, "does it answer?", before anything is
fetched by hub name.

Without a network the hub client spends minutes in retries on every file it asks for, and on a
network that accepts connections but never answers it waits forever: some of its requests have
no timeout. So a command that names something on the hub first asks the hub's endpoint once,
with a short timeout; if no answer comes, this process uses local files only (the hub cache
included), as with ``HF_HUB_OFFLINE=1``, and says so. ``HF_HUB_OFFLINE`` set either way skips
the question: 1 = local files only, 0 = always the hub.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from medqa_loop.config import EMBEDDED_TOKENIZER, Config

PROBE_TIMEOUT_S = 3.0  # name lookup, connection and reply together; the hub answers in well under 1 s


def looks_local(name: str) -> bool:
    """A path, not a hub name: written as one, or there on disk."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def is_hub_name(name: str) -> bool:
    """Whether ``name`` would be fetched from the hub: a valid repository id (an embedded dataset,
    ``embedded:...``, is not one) that is not a local path nor the tokenizer shipped with the
    project."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name == EMBEDDED_TOKENIZER or looks_local(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def run_sources(cfg: Config) -> list[str]:
    """What a training run loads by name: its tokenizer, its base (unless built at random) and
    its dataset."""
    model = cfg.model
    base = [] if model.random_init is not None else [model.name_or_path]
    return [model.tokenizer or model.name_or_path, *base, cfg.data.dataset]


@functools.cache
def hub_answers(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``endpoint`` answers a HEAD request within ``timeout`` seconds, asked once per
    process through the hub client's own session (its proxies and certificates). The request runs
    in a thread so that the wait is bounded even where the name lookup, which no socket timeout
    covers, hangs. An HTTP error status below 500 is an answer; a 5xx (a proxy's bad gateway) is not."""
    from huggingface_hub.utils import get_session

    answers: list[bool] = []

    def ask() -> None:
        try:
            answers.append(get_session().head(endpoint, timeout=timeout).status_code < 500)
        except Exception:  # noqa: BLE001 - refused, reset, timed out, no route, no name, TLS: all no answer
            answers.append(False)

    probe = threading.Thread(target=ask, name="hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return answers == [True]


def use_local_files_only() -> None:
    """Offline mode for the rest of this process, in every library that reads it: huggingface_hub
    (transformers asks it), datasets (its own copy, taken at import) and PEFT (which reads the
    environment)."""
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def use_local_files_if_unreachable(
    names: Iterable[str | None], say: Callable[[str], object] | None = None
) -> None:
    """Before anything named in ``names`` is loaded: if one is a hub name and ``HF_HUB_OFFLINE``
    is not set, ask the hub whether it answers; if not, use local files only and say so with
    ``say`` (default: on stderr, which leaves a command's output on stdout as it is)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:  # set either way: no question
        return
    if not any(is_hub_name(n) for n in names if n):
        return
    if not hub_answers(constants.ENDPOINT):
        use_local_files_only()
        (say or functools.partial(print, file=sys.stderr))(
            f"the hub ({constants.ENDPOINT}) did not answer within {PROBE_TIMEOUT_S:g} s: using local files "
            "only (hub names load from the hub cache); set HF_HUB_OFFLINE=1 to skip this check, "
            "HF_HUB_OFFLINE=0 to always use the hub"
        )
