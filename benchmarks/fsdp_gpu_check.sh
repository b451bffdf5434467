# FSDP on one GPU through accelerate launch vs the same run without a launcher: a random Llama-shaped base
# (hidden 1024, 8 layers, SmolLM2 tokenizer), converted, trained 40 steps both ways; prints loss/skipped per step and
# the largest difference of the trained router/adapter weights. Run from the repository root on a CUDA machine:
#   bash benchmarks/fsdp_gpu_check.sh ~/.cache/flexicli/SmolLM2-135M-Instruct.Q4_1-*/
set -x
OUT=${OUT:-/tmp/fsdp-check}; mkdir -p $OUT; TOK=${1:?tokenizer folder (SmolLM2 tokenizer.json etc.)}
rm -rf /tmp/w /tmp/ck /tmp/ck-plain /tmp/fc
export PYTHONPATH=$PWD FLEXI_CACHE=/tmp/fc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.get_device_name())"
python3 benchmarks/fsdp_demo.py /tmp/w $TOK --hidden 1024 --layers 8 2>/dev/null || exit 1
python3 -m flexicli convert /tmp/w/base -o /tmp/ck --dtype bfloat16 --device cpu --json > $OUT/convert.json || exit 1
cat $OUT/convert.json
cp -r /tmp/ck /tmp/ck-plain
ARGS="--skip-target 2 --data /tmp/w/train.txt --steps 40 --batch-size 8 --seq-len 256 --eval-every 20 --json"
time python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp-1gpu.yaml -m flexicli train -m /tmp/ck $ARGS > $OUT/fsdp.json 2> $OUT/fsdp.err
echo "fsdp rc=$?"; tail -c 3000 $OUT/fsdp.err; cp /tmp/ck/metrics.jsonl $OUT/fsdp_metrics.jsonl
time python3 -m flexicli train -m /tmp/ck-plain --device cuda $ARGS > $OUT/plain.json 2> $OUT/plain.err
echo "plain rc=$?"; tail -c 1500 $OUT/plain.err; cp /tmp/ck-plain/metrics.jsonl $OUT/plain_metrics.jsonl
python3 - <<'PY'
import json
from safetensors.torch import load_file
for name in ("fsdp", "plain"):
    print(name)
    for line in open(f"/tmp/ck{'' if name == 'fsdp' else '-plain'}/metrics.jsonl"):
        r = json.loads(line)
        if r["step"] % 5 == 0 or r["step"] == 1:
            print(f"  step {r['step']:3d} loss {r['loss']:.4f} skipped {r['mean_skipped_layers']:.3f} lambda {r['lambda']:.3f} tok/s {r['tokens_per_s']:.0f}", r.get("heldout", ""))
a, b = load_file("/tmp/ck/flexi_weights.safetensors"), load_file("/tmp/ck-plain/flexi_weights.safetensors")
print("max |fsdp - plain| over router/adapter weights:", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
for name in ("fsdp", "plain"):
    s = json.load(open(f"/tmp/ck{'' if name == 'fsdp' else '-plain'}/flexi_config.json"))["training"]
    print(name, {k: s.get(k) for k in ("mean_skipped_layers", "kl", "top1_agreement", "threshold", "greedy_match", "trained_threshold_skipped")})
PY
