"""A stand-in for SyntheticMedicalQA-4336 with its shape: 4,336 pairs, ~470 tokens a pair on
average (lognormal, sigma ~0.45), capped at 1,024 tokens (../shared/dataset-facts.md).

Texts are made of whole-word tokens of the real tokenizer, so a pair re-tokenizes to about the
length drawn for it. The distribution is a parameter: --mean-tokens, --sigma, --cap, --rows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def word_tokens(tokenizer, n: int = 4000) -> list[str]:
    """Word-like vocabulary entries ('▁word'), which decode and re-encode to one token each."""
    words = []
    for piece, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if piece.startswith("▁") and piece[1:].isalpha() and piece[1:].islower() and len(piece) > 3:
            words.append(piece[1:])
    return words[:n]


def make_rows(tokenizer, rows: int, mean_tokens: float, sigma: float, cap: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = word_tokens(tokenizer)
    mu = math.log(mean_tokens) - sigma**2 / 2  # so that the lognormal's *mean* is mean_tokens
    out = []
    for _ in range(rows):
        total = min(cap, max(48, int(rng.lognormvariate(mu, sigma))))
        n_question = rng.randint(12, 30)
        # ~14 tokens go to the template, BOS and EOS.
        n_answer = max(8, total - n_question - 14)
        question = " ".join(rng.choice(words) for _ in range(n_question)).capitalize() + "?"
        answer = " ".join(rng.choice(words) for _ in range(n_answer)).capitalize() + "."
        out.append({"question": question, "response": answer})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--rows", type=int, default=4336)
    p.add_argument("--mean-tokens", type=float, default=470)
    p.add_argument("--sigma", type=float, default=0.45)
    p.add_argument("--cap", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from transformers import AutoTokenizer

    rows = make_rows(AutoTokenizer.from_pretrained(a.tokenizer), a.rows, a.mean_tokens, a.sigma, a.cap, a.seed)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
