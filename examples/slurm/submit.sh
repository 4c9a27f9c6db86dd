#!/bin/bash
# Submit the whole chain, each step waiting for the one before (--dependency=afterok): preprocess
# once -> train folds 0-4 (array) -> predict in parts (array) -> evaluate and report.
#
#   PANCSEG_CONFIG=pancseg.yaml PANCSEG_INPUT=scans/ PANCSEG_OUTPUT=predictions/ \
#   PANCSEG_GT=labels/ bash examples/slurm/submit.sh
#
# Every job gets this environment (sbatch's default --export=ALL). Add your cluster's options
# (--partition, --account) to the sbatch lines or the templates' #SBATCH headers.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${PANCSEG_INPUT:?set PANCSEG_INPUT to the folder of scans to predict}"
: "${PANCSEG_OUTPUT:?set PANCSEG_OUTPUT to the output folder}"
export PANCSEG_CONFIG=${PANCSEG_CONFIG:-pancseg.yaml}

prep=$(sbatch --parsable "$HERE/preprocess.sbatch")
train=$(sbatch --parsable --dependency="afterok:$prep" "$HERE/train_array.sbatch")
predict=$(sbatch --parsable --dependency="afterok:$train" "$HERE/predict_array.sbatch")
report=$(sbatch --parsable --dependency="afterok:$predict" "$HERE/evaluate.sbatch")
echo "submitted: preprocess $prep -> train $train -> predict $predict -> evaluate $report"
