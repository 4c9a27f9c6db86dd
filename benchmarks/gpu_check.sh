#!/usr/bin/env bash
# GPU check (not CI; results in BENCHMARKS.md). Two parts, each timed:
#  1. the CLI as a user runs it on a GPU, smoke preset: `pancseg run` with train/predict on DEVICE,
#     `train --resume` to one more epoch, `predict --device DEVICE` twice (the second skips every case);
#  2. benchmarks/learning_check.py with ResEnc-M plans (preset default) on DEVICE, with the
#     multi-task/stock iteration-time ratio (whole epochs, data loading included);
#  4. benchmarks/predict_speed.py with ResEnc-M plans: a model trained briefly on DEVICE, then stock
#     nnU-Net's prediction against `pancseg predict` on quiz-sized crops and full-CT-sized scans
#     (in-process step table first, then whole commands ABBA; PS_* variables size it);
#  3. benchmarks/step_timing.py on the same data and plans: the two trainers' train_step side by side
#     in one process on cached batches, how fast the data-augmentation workers deliver, real iterations
#     (loader + step) in blocks as epochs run them, the operators one step of each dispatches, and
#     torch.profiler tables of each trainer's steps (profile_*.txt);
#  5. benchmarks/predict_parts.py: one prediction by 1 and by 2 worker processes on the one GPU
#     (`predict --devices DEVICE` against `--devices DEVICE,DEVICE`), smoke model, mirroring on
#     (PP_MODE=parts: two `--part` commands instead; PP_CASES, PP_SHAPE, PP_REPEATS size it; not yet run
#     on a GPU: expect a few minutes).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [DEVICE]   (env: PARTS="1 2", PYTHON, LC_EPOCHS, LC_ITERS,
#        LC_CASES, DA_WORKERS, TIMING_REPEATS, TIMING_ITERS, STEPS, LIVE_BLOCKS, COMPILE_HEAD=1: part 3 also
#        times the multi-task trainer with its head compiled, PART2_SECONDS: part 2's time limit,
#        EXTRA_SET: one more --set for parts 2 and 3; small values and EXTRA_SET=train.batch_size=2
#        give a dry run on a CPU)
# On an H200 part 1 takes about 2.5 min, part 2 about 7 (30 x 40 epochs, 2 timing repeats), 5 (20 x 40,
# 2 repeats) or 6 (1 x 5 epochs, 4 timing repeats), part 3 2 without live blocks
# (LIVE_BLOCKS=0; each block adds ~6 s per trainer at 70 iterations of ~85 ms; COMPILE_HEAD=1 about
# 1.5 min more: a third trainer and its compilation). The iteration-time ratio of BENCHMARKS.md
# (whole epochs, the target, and live blocks with their waits; 7.1 min):
#   PARTS="3 2" LC_EPOCHS=1 LC_ITERS=5 TIMING_REPEATS=3 TIMING_ITERS=20 DA_WORKERS=12 LIVE_BLOCKS=4 \
#       PART2_SECONDS=290 bash benchmarks/gpu_check.sh $OUT cuda
# A machine without a package index needs nnunetv2 and its dependencies brought along:
# benchmarks/device_site.sh builds them as .whl/devsite.tar.xz (carry .whl; there:
# tar -xJf .whl/devsite.tar.xz -C /tmp && export PYTHONPATH=/tmp/devsite:$PWD).
set -euo pipefail  # pipefail: a failing pancseg command piped into tee stops the check
out=$(realpath -m "$1")
device=${2:-cuda}
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
mkdir -p "$out"
extra=()
[[ -n ${EXTRA_SET:-} ]] && extra=(--set "$EXTRA_SET")
step_extra=()
[[ -n ${COMPILE_HEAD:-} ]] && step_extra=(--compile-head)
pancseg() { "$py" -m pancreas_cli "$@"; }
stamp() { echo "== $(date +%T) $*" | tee -a "$out/timeline.txt"; }

part1() {
    stamp "part 1: CLI on $device"
    smoke=$work/smoke
    pancseg synth "$smoke/data" --cases 12 --quirks
    cat >"$smoke/pancseg.yaml" <<EOF
project_dir: ./work
dataset: {source: ./data, test_labels: ./data/test_ground_truth,
          test_subtypes_csv: ./data/test_ground_truth/subtypes.csv}
plan: {preset: smoke, num_processes: 4}
train: {device: $device, epochs: 3, iterations_per_epoch: 10, val_iterations: 2, save_every: 1,
        da_workers: ${DA_WORKERS:-4}}
predict: {device: $device}
evaluate: {bootstrap: 200}
EOF
    cd "$smoke"
    pancseg run -c pancseg.yaml 2>&1 | tee "$out/part1.log"
    stamp "resume to 4 epochs"
    pancseg train -c pancseg.yaml --fold 0 --resume --epochs 4 --json 2>&1 | tee -a "$out/part1.log"
    stamp "predict twice"
    pancseg predict -c pancseg.yaml -i data/test -o pred --device "$device" --json 2>&1 | tee -a "$out/part1.log"
    pancseg predict -c pancseg.yaml -i data/test -o pred --device "$device" --json 2>&1 | tee -a "$out/part1.log"
    cat pred/subtype_results.csv | tee -a "$out/part1.log"
    cp work/nnUNet_results/*/nnUNetTrainerMultiTask__*/fold_0/metrics.csv "$out/part1_metrics.csv"
}

part2() {
    stamp "part 2: learning check, ResEnc-M on $device"
    cd "$repo"
    # The report is written after each stage and timing run, so a part stopped at PART2_SECONDS
    # (0: no limit) still brings back what it measured.
    local status=0
    timeout "${PART2_SECONDS:-0}" "$py" benchmarks/learning_check.py --workdir "$work/lc" --preset default \
        --device "$device" --shape 32,64,64 \
        --cases "${LC_CASES:-60}" --epochs "${LC_EPOCHS:-40}" --iterations "${LC_ITERS:-40}" --val-iterations 5 \
        --set "train.da_workers=${DA_WORKERS:-4}" --set plan.num_processes=8 "${extra[@]}" \
        --timing-repeats "${TIMING_REPEATS:-2}" --timing-iterations "${TIMING_ITERS:-30}" \
        >/dev/null 2>"$out/part2_stderr.txt" || status=$?
    cp "$work/lc/benchmark.json" "$out/part2_benchmark.json" 2>/dev/null || true
    cp "$work"/lc/work/nnUNet_results/*/nnUNetTrainerMultiTask__*/fold_0/metrics.csv "$out/part2_metrics.csv" \
        2>/dev/null || true
    if ((status)); then tail -n 40 "$out/part2_stderr.txt"; exit "$status"; fi
}

part3() {
    stamp "part 3: step timing, ResEnc-M on $device"
    cd "$repo"
    "$py" benchmarks/step_timing.py --workdir "$work/lc" --preset default --device "$device" --shape 32,64,64 \
        --cases "${LC_CASES:-60}" --set "train.da_workers=${DA_WORKERS:-4}" --set plan.num_processes=8 "${extra[@]}" \
        --steps "${STEPS:-40}" --live-blocks "${LIVE_BLOCKS:-4}" "${step_extra[@]}" --profile-dir "$out" >"$out/part3_steps.json" 2>"$out/part3_stderr.txt" || { tail -n 40 "$out/part3_stderr.txt"; exit 1; }
}

part4() {
    stamp "part 4: predict speed, ResEnc-M on $device"
    cd "$repo"
    local status=0
    timeout "${PART4_SECONDS:-0}" "$py" benchmarks/predict_speed.py --workdir "$work/ps" --device "$device" \
        --preset "${PS_PRESET:-default}" --cases "${PS_CASES:-5}" --sizes "${PS_SIZES:-64x128x176,120x256x256}" \
        --train-cases "${PS_TRAIN_CASES:-24}" --epochs "${PS_EPOCHS:-12}" --iterations "${PS_ITERS:-40}" \
        --processes "${PS_PROCESSES:-8}" --crop "${PS_CROP:-64x128x176}" ${PS_COMPILE:+--compile-variant} --batch-sweep "${PS_BATCHES:-1,2,4,8,16}" --contributions --reference \
        >"$out/part4_summary.json" 2>"$out/part4_stderr.txt" || status=$?
    cp "$work/ps/predict_speed.json" "$out/part4_predict_speed.json" 2>/dev/null || true
    cp "$work"/ps/project/work/nnUNet_results/*/nnUNetTrainerMultiTask__*/fold_0/metrics.csv "$out/part4_metrics.csv" \
        2>/dev/null || true
    if ((status)); then tail -n 40 "$out/part4_stderr.txt"; exit "$status"; fi
}

part5() {
    stamp "part 5: predict in parts, 1 and 2 processes on $device"
    cd "$repo"
    "$py" benchmarks/predict_parts.py --workdir "$work/pp" --mode "${PP_MODE:-devices}" --device "$device" \
        --cases "${PP_CASES:-16}" --shape "${PP_SHAPE:-64x128x176}" --repeats "${PP_REPEATS:-1}" --mirroring \
        >"$out/part5_summary.json" 2>"$out/part5_stderr.txt" || { tail -n 40 "$out/part5_stderr.txt"; exit 1; }
    cp "$work/pp/predict_parts.json" "$out/part5_predict_parts.json"
}

for part in ${PARTS:-1 2}; do "part$part"; done
stamp "done"
