#!/usr/bin/env bash
# Everything only a GPU shows, in one time-boxed pass (a lent GPU comes for minutes):
#   1. tests/test_perf.py on the GPU (fp16 / nf4 / int8 bases, bitsandbytes 8-bit AdamW, compile, ...)
#   2. the sd15-lora-512 benchmark (SD1.5 architecture, random weights, bf16, cached, batch 8, rank 16), eager;
#      2b. sdtune's side again under trainer.precision=bf16-true (fp32 master weights)
#   3. the same, torch.compile'd with CUDA graphs (reduce-overhead) and channels_last, sdtune vs U-Net only
#   4. stage-two pretraining of the tiny stack continued from the shipped weights for the time left, then
#      the judge's evaluation of the result (ship it with scripts/ship_tiny_weights.py if it is better)
#
#   bash scripts/gpu_checks.sh OUT_DIR [SECONDS]        (SKIP_TESTS=1 skips step 1, SKIP_BENCH=1 steps 1-3)
#   PRE_SEED=N renders step 4's 30,000 images from another seed (default 1000, the dataset of the first run)
#
# Python packages the machine lacks may lie as wheels in .whl/ (installed into /tmp/site first).
set -u
OUT=${1:?usage: gpu_checks.sh OUT_DIR [SECONDS]}
BUDGET=${2:-570}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled SDTUNE_CACHE_DIR=/tmp/sdtune-cache
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'EOF'
import importlib
for name in ("torch", "diffusers", "transformers", "peft", "pytorch_lightning", "hydra", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "MISSING", error)
EOF

PRE_IMAGES=${PRE_IMAGES:-30000}
PRE_SEED=${PRE_SEED:-1000}
PRE_SHAPES="[circle,square,triangle,hexagon]"
# Stage-two data is generated on the CPU while the GPU runs the tests (flock: training waits for it).
python3 - <<EOF >/tmp/pretrain_data.log 2>&1 &
from pathlib import Path
from sdtune.data.shapes import ensure_dataset
shapes = ("circle", "square", "triangle", "hexagon")
print(ensure_dataset(Path("/tmp/sdtune-cache"), $PRE_IMAGES, 64, $PRE_SEED, shapes=shapes, workers=12))
EOF
DATA_PID=$!

if [ -z "${SKIP_BENCH:-}" ]; then
echo "== 1. tests/test_perf.py on the GPU ($(left) s left)"
[ -z "${SKIP_TESTS:-}" ] && timeout 90 python3 -m pytest tests/test_perf.py -q -p no:cacheprovider -W ignore 2>&1 | tail -8

echo "== 2. sd15-lora-512 eager ($(left) s left)"
timeout 150 python3 scripts/benchmark.py --workload sd15-lora-512 --cache --steps 20 --warmup 8 --repeats 1 \
  --cache-dir /tmp/sdtune-cache >"$OUT/bench_eager.json"
cat "$OUT/bench_eager.json"

echo "== 2b. the same, sdtune under bf16-true (no autocast, fp32 master weights), channels_last ($(left) s left)"
timeout 120 python3 scripts/benchmark.py --workload sd15-lora-512 --cache --channels-last --sides sdtune \
  --override trainer.precision=bf16-true --steps 20 --warmup 8 --repeats 1 --cache-dir /tmp/sdtune-cache \
  >"$OUT/bench_bf16_true.json"
cat "$OUT/bench_bf16_true.json"

echo "== 3. sd15-lora-512 compiled: CUDA graphs, channels_last, fused AdamW ($(left) s left)"
timeout 240 python3 scripts/benchmark.py --workload sd15-lora-512 --cache --compile --compile-mode reduce-overhead \
  --channels-last --sides sdtune,unet_only --steps 20 --warmup 8 --repeats 1 --cache-dir /tmp/sdtune-cache \
  >"$OUT/bench_compiled.json"
cat "$OUT/bench_compiled.json"
fi

wait $DATA_PID  # not a bare wait: that would also wait for the tee above
tail -c 300 /tmp/pretrain_data.log
TRAIN=$(($(left) - 140))  # leaves time for the latent cache, export and evaluation
echo "== 4. stage-two pretraining for ${TRAIN} s ($(left) s left)"
if [ "$TRAIN" -gt 30 ]; then
  timeout $((TRAIN + 110)) python3 -m sdtune.train +experiment=pretrain vae_run=none model.pretrained=null \
    data.num_images=$PRE_IMAGES data.seed=$PRE_SEED "data.shapes=$PRE_SHAPES" data.batch_size=512 data.num_workers=12 \
    trainer.max_steps=1000000 "trainer.max_time=$(printf '00:00:%02d:%02d' $((TRAIN / 60)) $((TRAIN % 60)))" trainer.log_every_n_steps=100 \
    evaluation.every_n_steps=0 sampling.prompts=[] callbacks.checkpoint.every_n_train_steps=2000 \
    paths.cache_dir=/tmp/sdtune-cache hydra.run.dir=/tmp/pretrain >/tmp/pretrain.log 2>&1
  grep -v "━" /tmp/pretrain.log | tail -15
  tr '\r' '\n' </tmp/pretrain.log | grep "train/loss" | tail -1
  tail -3 /tmp/pretrain/csv/metrics.csv 2>/dev/null
  if [ -d /tmp/pretrain/pipeline ]; then
    python3 scripts/ship_tiny_weights.py /tmp/pretrain/pipeline --out /tmp/ship \
      && cp /tmp/ship/unet.safetensors /tmp/ship/text_encoder.safetensors "$OUT/"
    echo "== 5. judge the continued base ($(left) s left)"
    timeout $(($(left) - 5)) python3 -m sdtune.evaluate source=/tmp/pretrain out="$OUT/eval" judge_renders=0 \
      2>&1 | grep -v "it/s\]" | tail -12
  fi
fi
echo "== done ($(left) s left)"
