"""The task suite's answers item by item, original against routed: what a lost item says instead.

    python benchmarks/task_answers.py CKPT OUT.json [CATEGORY] [N]

CATEGORY: one of the suite's categories (default factual_qa), its first N items (default 48, all); decoded as
`flexi eval` decodes them (greedy, the category's answer length; 8 prompts a batch, where `flexi eval` decodes a
category's 48 together), with the checkpoint's routing and threshold. Prints one JSON line per item ({"prompt",
"answer", "original", "routed", "score_original", "score_routed"}) as it goes and the totals at the end; OUT.json gets
the list.
"""
import json, sys
from flexicli.core.flexi_model import FlexiModel
from flexicli.data.tasks import load_tasks
from flexicli.data.tokens import prompt_ids
from flexicli.evaluation.evaluate import generate_ids

ckpt, out_file = sys.argv[1], sys.argv[2]
category = sys.argv[3] if len(sys.argv) > 3 else "factual_qa"
fm = FlexiModel.load(ckpt)
tasks = load_tasks([category], int(sys.argv[4]) if len(sys.argv) > 4 else 48)
items = []
for i in range(0, len(tasks), 8):
    batch = tasks[i:i + 8]
    prompts = [prompt_ids(fm.tokenizer, t.prompt, chat=True) for t in batch]
    decoded = {mode: fm.tokenizer.batch_decode(generate_ids(fm, prompts, batch[0].max_new_tokens, {"mode": mode}),
                                               skip_special_tokens=True) for mode in ("full", "routed")}
    for t, o, r in zip(batch, decoded["full"], decoded["routed"]):
        items.append({"prompt": t.prompt, "answer": t.answer, "original": o, "routed": r,
                      "score_original": t.score(o), "score_routed": t.score(r)})
        print(json.dumps(items[-1]), flush=True)
json.dump(items, open(out_file, "w"), indent=1)
print(f"{category}: {len(items)} items, original {sum(x['score_original'] for x in items):g}, "
      f"routed {sum(x['score_routed'] for x in items):g}")
