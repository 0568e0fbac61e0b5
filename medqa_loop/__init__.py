"""medqa_loop: an explicit, debuggable PyTorch loop on Accelerate that fine-tunes Mistral-7B with
LoRA over an 8-bit bitsandbytes base on medical QA. ``medqa --help`` lists the commands;
README.md has the layout."""

__version__ = "0.2.0"
