#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/BENCHMARKS.md's "GPU figures", for a one-GPU machine whose
# python3 already holds torch, timm, accelerate and triton (nothing is installed: the repo is run from
# PYTHONPATH). Each part has its own time limit and writes into $OUT as it goes, so a part that fails or
# runs out of time still leaves the others' figures. Sizes can be shrunk through the variables below (the CPU
# smoke run in tests uses tiny ones). The device tool brings back at most 8 files, so every part's output goes
# to a work folder outside $OUT, re-archived into $OUT/results.tgz after each part: $OUT holds only that and
# log.txt.
#
#   OUT=gpu_out bash .ci/gpu_bench.sh                       # the parts the recorded figures came from
#   PARTS="loss_bf16 step_compiled" OUT=gpu_out bash .ci/gpu_bench.sh   # after docs/BENCHMARKS.md's plan
#   PARTS=loader_gpu ...   # DALI (mixed decode) and FFCV: needs .ci/device_bundle.sh's parts carried first
set -u
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
LOSS_N=${LOSS_N:-8192,32768,131072,262144}
BATCH=${BATCH:-1024}            # global = per-GPU batch here: one process
SIZE=${SIZE:-224}
SRC_SIZE=${SRC_SIZE:-320}       # side of the generated JPEGs the 224 px views are cut from
PER_CLASS=${PER_CLASS:-1000}    # per class and generator: 10 classes x GENERATORS x PER_CLASS images
GENERATORS=${GENERATORS:-8}     # drawn in parallel (seeds 0..), merged: 80,000 images = 78 batches of 1024
WORKERS=${WORKERS:-8}           # the goal: at most 8 CPU cores per GPU
STEPS=${STEPS:-8}               # bench model: no loader, nothing prepared ahead
WARMUP=${WARMUP:-3}
# bench step and loader: 8 workers x 2 batches each are prepared before the first is asked for. The warm-up
# takes at least that queue (bench's warmup_for) and the timed window must be several times longer, or it
# times batches made before it opened (the first step figures, 8 timed steps, measured only the main process).
LOADER_STEPS=${LOADER_STEPS:-60}  # 16 / 60: at most 27% pre-made; 16 + 60 steps fit one epoch of 78
LOADER_WARMUP=${LOADER_WARMUP:-16}
LARGEST=${LARGEST:-1536}        # model_largest: batch tried; below LARGEST_MIN it is "does not fit"
LARGEST_MIN=${LARGEST_MIN:-1024}  # (1024 is measured by model_r50: R50 peaked at 87 of 140 GiB on an H200)
BIG_SIZE=${BIG_SIZE:-448}       # loader_gpu: JPEG side, ImageNet's average pixel count (~500 x 375)
# per class and generator (16 of them): 8,000 images, 15 batches of 512, so loader_gpu's 76 batches cross 5 epoch
# starts, each backend's (every start refills the prefetch queue): a lower bound on the steady state, kept so
# to draw and convert the images within the call (one epoch of 76 batches would be 39,000 images)
BIG_PER_CLASS=${BIG_PER_CLASS:-50}
LOADER_BATCH=${LOADER_BATCH:-512}
PARTS=${PARTS:-"loss triton_tests model_r50 step_r50 step_vits loader demo"}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
W=$(mktemp -d)
DATA=$(mktemp -d)/syn

part() {  # part NAME LIMIT_S CMD...: run CMD with a time limit, log its rc and seconds, keep its output
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  case " env $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*" >>"$OUT/log.txt"
  timeout "$limit" "$@" >"$W/$name.txt" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  tail -n 30 "$W/$name.txt"
  tar czf "$OUT/results.tgz.tmp" -C "$W" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
wants() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }

part env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; $PY -c '
import torch, timm, accelerate, numpy
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__, \"accelerate\",
      accelerate.__version__, \"triton\", tv, \"numpy\", numpy.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
# The dataset is drawn on the CPU while the loss benchmark uses the GPU: one epoch must hold every timed
# step, or each step would pay an epoch boundary.
draw() {
  local i
  for ((i = 0; i < GENERATORS; i++)); do
    $PY tools/make_synthetic.py "$DATA.$i" --seed "$i" --size "$SRC_SIZE" --train-per-class "$PER_CLASS" \
        --val-per-class 1 &
  done
  local pid failed=0
  for pid in $(jobs -p); do wait "$pid" || failed=1; done  # a bare `wait` returns 0 whatever the children did
  [ "$failed" = 0 ] || return 1
  for ((i = 0; i < GENERATORS; i++)); do
    for d in "$DATA.$i"/train/*/; do
      mkdir -p "$DATA/train/$(basename "$d")"
      for f in "$d"*.jpg; do mv "$f" "$DATA/train/$(basename "$d")/g$i-$(basename "$f")"; done
    done
  done
  find "$DATA/train" -name '*.jpg' | wc -l
}
synth=
if wants step_r50 || wants step_vits || wants step_compiled || wants loader; then
  draw >"$W/synthetic.txt" 2>&1 &
  synth=$!
fi
big=
if wants loader_gpu; then
  BIG=$(mktemp -d)/big
  (DATA=$BIG SRC_SIZE=$BIG_SIZE PER_CLASS=$BIG_PER_CLASS GENERATORS=16 draw) >"$W/synthetic_big.txt" 2>&1 &
  big=$!
fi
part loss 120 $PY tools/bench.py loss --device "$DEVICE" --n "$LOSS_N" --d 128 --impl naive,chunked,triton \
    --repeats 3 --max-seconds 20 --json "$W/loss.json" --plot "$W/loss.png"
part loss_bf16 120 $PY tools/bench.py loss --device "$DEVICE" --n "$LOSS_N" --d 128 --impl naive,chunked,triton \
    --dtype bf16 --repeats 2 --max-seconds 30 --json "$W/loss_bf16.json" --plot "$W/loss_bf16.png"
# fp32 inputs after the switch to 3xTF32 (issue 4's speed target at 8k), without the slow chunked impl.
part loss_fp32 120 $PY tools/bench.py loss --device "$DEVICE" --n "$LOSS_N" --d 128 --impl naive,triton \
    --repeats 3 --max-seconds 20 --json "$W/loss_fp32.json" --plot "$W/loss_fp32.png"
part triton_tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_losses_triton.py
if [ -n "$synth" ]; then
  wait $synth; echo "== synthetic rc=$?" | tee -a "$OUT/log.txt"; tail -n 2 "$W/synthetic.txt"
fi
# data.compile: the on-device augmentation alone, eager (~400 operations a view) against compiled.
part augment 240 $PY tools/bench.py augment --device "$DEVICE" --augment simclr --size "$SIZE" \
    --source-size "$SRC_SIZE" --batch 256,"$BATCH" --steps 20 --warmup 3 --json "$W/augment.json"
part model_r50 180 $PY tools/bench.py model --device "$DEVICE" --recipe recipes/simclr_resnet50_in1k.yaml \
    --batch "$BATCH" --compile false,true --steps "$STEPS" --warmup "$WARMUP" --json "$W/model_r50.json"
# Issue 7's "largest batch that fits": $LARGEST, or "does not fit" if the back-off would go below $LARGEST_MIN
# (measured already). One part per model, so each can ride along with a call that carries a bundle part. The
# augmentation stays eager in both rows (data.compile=false), as in model_r50's figures: the networks are compared.
part model_largest_r50 180 $PY tools/bench.py model --device "$DEVICE" --recipe recipes/simclr_resnet50_in1k.yaml \
    --batch "$LARGEST" --min-batch "$LARGEST_MIN" --compile false,true --steps "$STEPS" --warmup "$WARMUP" \
    data.compile=false --json "$W/model_r50_largest.json"
part model_largest_vits 180 $PY tools/bench.py model --device "$DEVICE" --recipe recipes/mocov3_vit_small_in1k.yaml \
    --batch "$LARGEST" --min-batch "$LARGEST_MIN" --compile false,true --steps "$STEPS" --warmup "$WARMUP" \
    data.compile=false --json "$W/model_vits_largest.json"
part step_compiled 300 $PY tools/bench.py step --device "$DEVICE" --recipe recipes/simclr_resnet50_in1k.yaml \
    --batch "$BATCH" --workers "$WORKERS" --backend torch --steps "$LOADER_STEPS" --warmup "$LOADER_WARMUP" \
    data.path="$DATA/train" data.image_size="$SIZE" model.compile=true data.compile=true --json "$W/step_r50_compiled.json"
part step_r50 200 $PY tools/bench.py step --device "$DEVICE" --recipe recipes/simclr_resnet50_in1k.yaml \
    --batch "$BATCH" --workers "$WORKERS" --backend torch --steps "$LOADER_STEPS" --warmup "$LOADER_WARMUP" \
    data.path="$DATA/train" data.image_size="$SIZE" model.compile=false data.compile=false --json "$W/step_r50.json"
part step_vits 200 $PY tools/bench.py step --device "$DEVICE" --recipe recipes/mocov3_vit_small_in1k.yaml \
    --batch "$BATCH" --workers "$WORKERS" --backend torch --steps "$LOADER_STEPS" --warmup "$LOADER_WARMUP" \
    data.path="$DATA/train" data.image_size="$SIZE" model.compile=false data.compile=false --json "$W/step_vits.json"
part loader 60 $PY tools/bench.py loader --device "$DEVICE" --data "$DATA/train" --backend torch,pil \
    --size "$SIZE" --batch 256 --workers "$WORKERS" --batches "$LOADER_STEPS" --warmup "$LOADER_WARMUP" \
    --json "$W/loader.json" \
    --plot "$W/loader.png"
# Issues 5 and 6: DALI's mixed (nvJPEG / hardware) decode and FFCV against the torch backend on JPEGs of
# ImageNet's pixel count, one decode per image, both views made on the GPU; then the GPU-only DALI test.
if [ -n "$big" ]; then
  wait $big; echo "== synthetic_big rc=$?" | tee -a "$OUT/log.txt"; tail -n 2 "$W/synthetic_big.txt"
fi
# One row per backend and process, so one backend's failure keeps the others' figures; the torch row before the
# bundle's libraries join the loader path; the .beton written before any process holds a CUDA context.
LOADER_ARGS="--device $DEVICE --data ${BIG:-none}/train --size $SIZE --batch $LOADER_BATCH --workers $WORKERS \
    --batches $LOADER_STEPS --warmup $LOADER_WARMUP"
part loader_gpu 420 bash -c "$PY tools/bench.py loader --backend torch $LOADER_ARGS --json $W/loader_gpu_torch.json; \
    . .ci/device_unpack.sh; $PY tools/convert_ffcv.py ${BIG:-none}/train ${BIG:-none}.beton --workers 16 --overwrite; \
    $PY tools/bench.py loader --backend dali $LOADER_ARGS --json $W/loader_gpu_dali.json; \
    $PY tools/bench.py loader --backend ffcv --beton ${BIG:-none}.beton $LOADER_ARGS --json $W/loader_gpu_ffcv.json; \
    $PY -m pytest -q -p no:cacheprovider tests/test_dali.py tests/test_ffcv.py -k gpu"
# The demo recipe end to end on the GPU (views made there, bf16, encoder compiled: model.compile=auto).
part demo 150 bash -c "$PY tools/make_synthetic.py $DATA.demo && $PY tools/train.py \
    recipes/simclr_resnet18_synthetic.yaml data.path=$DATA.demo/train eval.knn_val_path=$DATA.demo/val \
    output_dir=$DATA.run train.progress=false ${DEMO_ARGS:-} && cp $DATA.run/summary.json $DATA.run/metrics.jsonl $W/"
echo "== done" | tee -a "$OUT/log.txt"
