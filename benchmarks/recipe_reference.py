"""The original recipe (../shared/seed) through the HF Trainer, for reference timings only.

Faithful to the seed except where it cannot run here or would not measure what it claims:
8-bit is really on (`load_in_8bit`, where the seed's `load_in_7Bit` typo silently disabled it),
no hub code (`trust_remote_code` off: Mistral is native), evaluation off during the timed steps,
and local model/tokenizer/data paths. Prints one JSON line with samples/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True, help=".jsonl with question/response")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output-dir", default="/tmp/recipe_reference")
    a = p.parse_args()

    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer,
                              TrainerCallback, TrainingArguments)

    dataset = load_dataset("json", data_files=a.data, split="train")
    dataset = dataset.rename_column("question", "input_text").rename_column("response", "output_text")
    split = dataset.train_test_split(test_size=0.2)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True,
                             llm_int8_skip_modules=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, device_map="auto",
                                                 dtype=torch.float32)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", inference_mode=False, r=16, lora_alpha=32, lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

    def tokenize_function(examples):
        prompts = [f"### Question:\n{t}\n\n### Answer:\n" for t in examples["input_text"]]
        full = [pr + o for pr, o in zip(prompts, examples["output_text"])]
        tok = tokenizer(full, truncation=True, padding="max_length", max_length=1024)
        tok["labels"] = tok["input_ids"].copy()
        return tok

    train = split["train"].map(tokenize_function, batched=True, remove_columns=split["train"].column_names)

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    clock = Clock()
    args = TrainingArguments(
        output_dir=a.output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=16,
        learning_rate=1e-4, max_steps=a.steps, logging_steps=10, save_strategy="no",
        eval_strategy="no", warmup_steps=100, gradient_checkpointing=True, fp16=False, bf16=False,
        optim="adamw_torch", max_grad_norm=0.3, weight_decay=0.01, remove_unused_columns=False,
        report_to=[],
    )
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=train, callbacks=[clock]).train()
    # The first step carries start-up costs: time the steps after it.
    per_step = (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)
    print(json.dumps({
        "samples_per_s": 16 / per_step,
        # Real (non-pad) tokens: the recipe pads every pair to 1024 but only these carry data.
        "tokens_per_s": 16 / per_step * sum(map(sum, train["attention_mask"])) / len(train),
        "padded_tokens_per_s": 16 * 1024 / per_step,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "steps_timed": len(clock.stamps) - 1,
    }))


if __name__ == "__main__":
    main()
