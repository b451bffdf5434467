"""Skipped layers, KL and top-1 by position: the held-out conversations one at a time (as `flexi eval` reads them)
against the same conversations packed end to end into rows of 256 tokens (as rows were packed before `879808e`).

    python benchmarks/position_probe.py CKPT

Prints, for each view, the totals and the figures at positions 0, 1-3, 4-15, 16-63 and 64 on (the position a token
predicts from). One sequence at a time, at the checkpoint's threshold.
"""
import sys

import torch

from flexicli.core.flexi_model import FlexiModel
from flexicli.data.text import heldout_texts
from flexicli.evaluation.evaluate import token_kl, top1_match

BUCKETS = [(0, 1), (1, 4), (4, 16), (16, 64), (64, None)]


def probe(fm, sequences, label):
    sums = {b: torch.zeros(4, dtype=torch.float64) for b in BUCKETS}  # tokens, skipped, KL, top-1
    for ids in sequences:
        ids = ids.unsqueeze(0)
        with torch.no_grad():
            with fm.routing("full"):
                original = fm.model(input_ids=ids, use_cache=False).logits[0, :-1]
            with fm.routing("routed"), fm.record() as rec:
                routed = fm.model(input_ids=ids, use_cache=False).logits[0, :-1]
        per_token = torch.stack([torch.ones(len(original)), rec.skipped_layers()[0, :-1].float(),
                                 token_kl(original, routed).float(), top1_match(original, routed).float()], 1)
        for lo, hi in BUCKETS:
            sums[(lo, hi)] += per_token[lo:hi].double().sum(0)
    total = sum(sums.values())
    for name, s in [("all", total)] + [(f"positions {lo}-{'' if hi is None else hi - 1}", s) for (lo, hi), s in
                                        sums.items()]:
        n = s[0].item()
        print(f"{label:>12} {name:>16}: tokens {int(n):5d}  skipped {s[1] / n:5.2f}  KL {s[2] / n:.3f}  "
              f"top-1 {s[3] / n:.3f}", flush=True)


fm = FlexiModel.load(sys.argv[1])
tok = fm.tokenizer
alone = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in heldout_texts(fm)]
stream = torch.cat([torch.cat([a, torch.tensor([tok.eos_token_id])]) for a in alone])
probe(fm, alone, "one at a time")
probe(fm, list(stream[: len(stream) // 256 * 256].view(-1, 256)), "end to end")
