"""medqa_loop: an explicit, debuggable PyTorch loop on Accelerate that fine-tunes Mistral-7B with
LoRA over an 8-bit bitsandbytes base on medical QA. ``medqa --help`` lists the commands;
README.md has the layout."""

__version__ = "0.2.0"

import logging as _logging

# Set before any submodule imports bitsandbytes (through peft or transformers): its warnings that
# no user of this package can act on. LLM.int8 multiplies in fp16 by design and says so on every
# fp32 call; on a CPU with AVX512-BF16 the import warns that an optional 4-bit kernel package
# (never used here) is missing.
for _name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
