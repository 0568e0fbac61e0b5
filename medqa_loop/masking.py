"""Loss masks: which tokens of a tokenized pair the loss trains on, and with what weight.

A mask is a function ``mask(example: MaskInput) -> list[float]`` (or ``list[bool]``) returning one
weight per token of the unpadded sequence. Weight 0 drops a token from the loss (its label
becomes -100); any positive weight scales that token's loss, and the window's loss is divided by
the sum of the weights, so a 0/1 mask gives the plain mean over target tokens and multiplying a
mask by a constant changes nothing. Padding never reaches a mask (a mask sees the unpadded pair,
so it has no pad positions): the collator gives pad positions weight 0.

Register your own with ``@register_mask("name")`` and select it with ``data.mask: name``, or
point ``data.mask`` at ``package.module:function`` without registering. Such a module is imported
when training tokenizes (resolve_mask), never when a config is read (check_mask).

Weight i belongs to the *label* at position i, i.e. how much predicting token i (from tokens
< i) counts. HF causal LMs shift labels themselves, so position 0 (BOS) is never predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from medqa_loop.config import ConfigError
from medqa_loop.user_code import check_import_path, load_callable


@dataclass(frozen=True)
class MaskInput:
    input_ids: list[int]  # BOS + prompt + answer (+ EOS unless truncated), unpadded
    prompt_len: int  # number of leading tokens that belong to BOS + prompt
    row: int  # index of the pair in the loaded dataset (before the train/val split)

    @property
    def answer_span(self) -> tuple[int, int]:
        """[start, end) of the answer tokens, EOS included when present."""
        return self.prompt_len, len(self.input_ids)


MaskFn = Callable[[MaskInput], list[float]]
MASKS: dict[str, MaskFn] = {}


def register_mask(name: str) -> Callable[[MaskFn], MaskFn]:
    def deco(fn: MaskFn) -> MaskFn:
        MASKS[name] = fn
        return fn

    return deco


@register_mask("completion_only")
def completion_only(ex: MaskInput) -> list[float]:
    """Train on the answer and EOS only: the model is not taught to write questions."""
    return [0.0] * ex.prompt_len + [1.0] * (len(ex.input_ids) - ex.prompt_len)


@register_mask("full_sequence")
def full_sequence(ex: MaskInput) -> list[float]:
    """The original recipe's loss on prompt and answer (its pad-token loss is not reproduced)."""
    return [1.0] * len(ex.input_ids)


# The weight of each prompt token under "prompt_weighted": enough for the model to keep modelling
# medical questions, small enough that the answer dominates (cf. OpenAI's former
# prompt_loss_weight, default 0.01, and Huerta-Enochian 2024 on small prompt-loss weights).
PROMPT_WEIGHT = 0.1


@register_mask("prompt_weighted")
def prompt_weighted(ex: MaskInput) -> list[float]:
    """Answer and EOS at weight 1, prompt tokens at PROMPT_WEIGHT (a weighted full_sequence)."""
    return [PROMPT_WEIGHT] * ex.prompt_len + [1.0] * (len(ex.input_ids) - ex.prompt_len)


def check_mask(spec: str) -> None:
    """``data.mask`` by its form: a registered name or ``package.module:function``, which is not
    imported (config validation). Raises ConfigError naming the key."""
    if spec in MASKS:
        return
    if ":" not in spec:
        raise ConfigError(f"config key 'data.mask': unknown mask {spec!r}: registered masks are {sorted(MASKS)}")
    check_import_path(spec, "data.mask")


def resolve_mask(spec: str) -> MaskFn:
    """The mask ``data.mask`` names: a registered one, or ``package.module:function`` imported
    now and checked to take one MaskInput (training calls this before it tokenizes)."""
    check_mask(spec)
    return MASKS[spec] if spec in MASKS else load_callable(spec, "data.mask", ("example",))


def apply_mask(fn: MaskFn, ex: MaskInput) -> list[float]:
    """Call a mask and check its output, so a buggy custom mask fails with the row it broke on."""
    weights = [float(w) for w in fn(ex)]
    if len(weights) != len(ex.input_ids):
        raise ValueError(
            f"mask returned {len(weights)} weights for {len(ex.input_ids)} tokens (row {ex.row})"
        )
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"mask returned a negative or NaN weight (row {ex.row})")
    return weights
