"""Per routed layer, skipped alone (its adapter in place): KL / top-1 on the original's answers to factual questions
(first 8 answer tokens, teacher-forced) and on the built-in held-out conversations. Which layers does recall need?

    python benchmarks/recall_probe.py CKPT ANSWERS.jsonl OUT.json [LAYERS]

ANSWERS.jsonl: {"prompt", "answer"} rows, e.g. the selfgen cache file a `fact_prompts: 236` run writes under
$FLEXI_CACHE/selfgen (the original's answers). LAYERS: routed layers to measure, in ascending order, as `flexi convert
--layers` writes them ('8,9,16', '10-17'; default: every routed layer). Each layer prints as it is measured; OUT.json
is written at the end. The held-out rows are the ones `flexi train` evaluates on (train.loop.heldout_rows).
"""
import json, sys, time
from flexicli.core.flexi_model import FlexiModel, parse_layers
from flexicli.data import text
from flexicli.evaluation.evaluate import compare_answers, compare_teacher_forced
from flexicli.data.text import unpadded
from flexicli.train.loop import heldout_rows

ckpt, answers_file = sys.argv[1], sys.argv[2]
fm = FlexiModel.load(ckpt)
tok = fm.tokenizer
rows = [json.loads(l) for l in open(answers_file)]
pairs = []
for r in rows:  # rendered as text.teacher_answers rendered them, so each answer follows the text it was made from
    p = tok(text.chat_text(tok, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]
    a = tok(r["answer"], add_special_tokens=False)["input_ids"][:8]
    pairs.append((p, a))
held = unpadded(heldout_rows(fm, 256))  # one conversation each, as flexi eval reads them
routed = fm.config.routed_layers
layers = parse_layers(sys.argv[4], fm.config.num_layers) if len(sys.argv) > 4 else routed
if set(layers) - set(routed):  # fixed routing skips only routed layers: another would measure nothing skipped
    sys.exit(f"layers {sorted(set(layers) - set(routed))} are not routed (routed: {routed})")
out = {}
for layer in layers:
    t0 = time.time()
    routing = {"mode": "fixed", "skip_layers": [layer]}
    a = compare_answers(fm, pairs, routing, 16)
    h = compare_teacher_forced(fm, held, routing, 8)
    out[layer] = {"fact_kl": round(a["task_answer_kl"], 3), "fact_top1": round(a["task_answer_top1"], 3),
                  "held_kl": round(h["kl"], 3), "held_top1": round(h["top1_agreement"], 3)}
    print(layer, out[layer], f"{time.time() - t0:.0f}s", flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
