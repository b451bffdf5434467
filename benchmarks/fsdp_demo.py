"""Build a random Llama-shaped base with the SmolLM2 tokenizer, for trying `flexi train` under FSDP on one GPU.

    python benchmarks/fsdp_demo.py OUT_DIR TOKENIZER_DIR [--hidden 1024 --layers 8]

Writes OUT_DIR/base (save_pretrained, bf16) and OUT_DIR/train.txt (the built-in prompts as paragraphs).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("tokenizer")
p.add_argument("--hidden", type=int, default=1024)
p.add_argument("--layers", type=int, default=8)
a = p.parse_args()
out = Path(a.out)
cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                  num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 128),
                  vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out / "base")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (Path(a.tokenizer) / name).is_file():
        shutil.copy(Path(a.tokenizer) / name, out / "base" / name)
prompts = [json.loads(line)["prompt"] for line in
           (Path(__file__).resolve().parent.parent / "flexicli/data/prompts.jsonl").read_text().splitlines() if line]
(out / "train.txt").write_text("\n\n".join(prompts * 4) + "\n")
print(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {a.layers} layers, hidden {a.hidden}")
