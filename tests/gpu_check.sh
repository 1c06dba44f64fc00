#!/usr/bin/env bash
# tests/gpu_check.sh -- does the project run where users run it? One GPU, no downloads, < 5 min.
#
#   bash tests/gpu_check.sh                 # on a machine with one CUDA GPU
#   DEVICE=cpu bash tests/gpu_check.sh      # dry run of the same stages on a CPU (tiny shapes)
#   env: OUT (results, default /tmp/autocode_gpu_check/out), GPU_DIR (default .gpu), PYTHON, SITE
#
# Random-weight models in the shapes of Qwen2.5-0.5B / 1.5B / 7B (`--model random:<dir>`, built
# directly on the device; they check code paths, speed and memory, not accuracy), the tokenizer
# from .gpu/tokenizer. Stages, each with its own timeout, each writing <stage>.log to $OUT:
#   env          python, torch, CUDA, the GPU
#   em-1proc     em_train.py, one iteration, one process, --dtype bf16, --device cuda
#   em-fsdp      the same under torchrun --nproc_per_node 1 --fsdp, with --grad-ckpt --save-dtype bf16
#   em-offload   torchrun --fsdp --cpu-offload (the shards and AdamW state in CPU memory)
#   bench-0.5b   bench.py sampler continuous --device cuda, 0.5B shape, batch 16 and 64
#   bench-7b     bench.py sampler --device cuda, 7B shape, 16 rows (sampling speed and memory)
#   plan         python distributed.py --plan
# summary.txt gets one line per stage: exit status, seconds, peak GPU memory seen by nvidia-smi.
# Not collected by pytest (not a test_*.py file).
#
# Setup (../shared/gpu/README.md): the machine has no network and an older transformers; copy
# ../shared/gpu to .gpu (ignored by git) so it travels with the checkout. This script does that
# copy when .gpu is missing and ../shared/gpu exists, then installs .gpu/whl into /tmp/site.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/autocode_gpu_check/out}
WORK=${WORK:-/tmp/autocode_gpu_check}
GPU_DIR=${GPU_DIR:-.gpu}            # the folder ../shared/gpu/README.md describes
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$WORK/models"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"

if [ "$GPU_DIR" = .gpu ] && [ ! -d .gpu ] && [ -d ../shared/gpu ]; then
    mkdir -p .gpu && cp -r ../shared/gpu/. .gpu/
    if [ -d .git ]; then
        mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
    fi
fi
[ -d "$GPU_DIR/whl" ] || { echo "error: no $GPU_DIR/whl (copy ../shared/gpu to .gpu, see ../shared/gpu/README.md)" >&2; exit 2; }
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$GPU_DIR"/whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "error: installing $GPU_DIR/whl failed, see $OUT/pip.log" >&2; exit 2; }
export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# One model directory per shape: config.json + the tokenizer (model.random_model reads both).
make_model() {   # name source.json [json of overrides]; prints the --model value
    local dir="$WORK/models/$1" overrides=${3:-'{}'}
    mkdir -p "$dir" && cp "$GPU_DIR"/tokenizer/* "$dir"/
    "$PYTHON" - "$2" "$dir/config.json" "$overrides" <<'EOF'
import json, sys
source, target, overrides = sys.argv[1:]
config = json.load(open(source))
config.update(json.loads(overrides))
if "layer_types" in config:
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
json.dump(config, open(target, "w"), indent=1)
EOF
    echo "random:$dir"
}

peak_watch() {   # background nvidia-smi sampler; prints its pid
    if command -v nvidia-smi > /dev/null && [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$1.mem" 2>/dev/null &
        echo $!
    fi
}

stage() {   # name timeout_s command...
    local name=$1 limit=$2; shift 2
    local watcher; watcher=$(peak_watch "$name")
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$OUT/commands.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ -n "$watcher" ] && kill "$watcher" 2> /dev/null
    local peak="-"
    [ -s "$OUT/$name.mem" ] && peak="$(sort -n "$OUT/$name.mem" | tail -1) MiB"
    printf '%-12s rc=%-3s %4ss  peak GPU memory (nvidia-smi) %s\n' "$name" "$rc" "$((SECONDS - t0))" "$peak" \
        | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || tail -5 "$OUT/$name.log" | sed 's/^/    /'
}

if [ "$DEVICE" = cuda ]; then
    SMALL=$(make_model qwen2.5-0.5b "$GPU_DIR"/configs/qwen2.5-0.5b.json)
    BIG=$(make_model qwen2.5-7b "$GPU_DIR"/configs/qwen2.5-7b.json)
    EM=(--queries-per-iter 4 --k 2 --max-new-tokens 128 --batch-size 2 --grad-accum 2 --sample-batch 16
        --eval-n 4 --eval-modes autonomous --iterations 1 --dtype bf16)
    # issue 12's shapes: 0.5B at batch 64 (>= 5x generate), 7B at 16 rows (>= 1,500 tok/s);
    # the 256-prompt continuous-batching run on the small shape (code rollouts need a model that
    # writes code: random weights do not)
    BENCH_SMALL=(sampler continuous --batches 16 64 --new-tokens 128 --dtype bf16 --rounds 1)
    BENCH_BIG=(sampler --batches 16 --new-tokens 128 --dtype bf16 --rounds 1)
else   # the dry run: SmolLM2's shape cut to 2 layers, a few tokens
    SMALL=$(make_model smollm2-2layers "$GPU_DIR"/configs/smollm2-135m.json '{"num_hidden_layers": 2}')
    BIG=$(make_model qwen2.5-7b-tiny "$GPU_DIR"/configs/qwen2.5-7b.json \
        '{"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}')
    EM=(--queries-per-iter 2 --k 1 --max-new-tokens 8 --batch-size 2 --grad-accum 1 --sample-batch 4
        --eval-n 2 --eval-modes autonomous --iterations 1 --dtype bf16)
    BENCH_SMALL=(sampler continuous --batches 1 2 --new-tokens 8 --cb-prompts 8 --cb-width 4 --rounds 1)
    BENCH_BIG=(sampler --batches 2 --new-tokens 8 --rounds 1)
fi
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1)

stage env 60 "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
stage em-1proc 150 "$PYTHON" em_train.py --model "$SMALL" --device "$DEVICE" "${EM[@]}" --out "$WORK/em-1proc"
stage em-fsdp 150 "${TORCHRUN[@]}" em_train.py --fsdp --model "$SMALL" "${EM[@]}" --grad-ckpt --save-dtype bf16 \
    --out "$WORK/em-fsdp"
stage em-offload 150 "${TORCHRUN[@]}" em_train.py --fsdp --cpu-offload --model "$SMALL" "${EM[@]}" --out "$WORK/em-offload"
stage bench-0.5b 150 "$PYTHON" bench.py "${BENCH_SMALL[@]}" --model "$SMALL" --device "$DEVICE" --out "$OUT/bench-0.5b.jsonl"
stage bench-7b 180 "$PYTHON" bench.py "${BENCH_BIG[@]}" --model "$BIG" --device "$DEVICE" --out "$OUT/bench-7b.jsonl"
stage plan 60 "$PYTHON" distributed.py --plan
for run in em-1proc em-fsdp em-offload; do     # the metrics lines, for the record
    [ -f "$WORK/$run/metrics.jsonl" ] && cp "$WORK/$run/metrics.jsonl" "$OUT/$run.metrics.jsonl"
done
ls "$WORK/em-fsdp/checkpoint/export-bf16" > "$OUT/em-fsdp.export.txt" 2>&1
echo "results in $OUT (summary.txt, <stage>.log)"
! grep -q 'rc=[1-9]' "$OUT/summary.txt"
