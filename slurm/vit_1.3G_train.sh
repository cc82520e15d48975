#!/usr/bin/env bash
# Superformer training for the ViTAS 1.3G-MACs space (yamls/vitas-deit-1.3G.yaml), in the manner of
# ViTAS's per-budget scripts: NODES nodes x 8 GPUs, one task per GPU, BCNet sampling, global batch
# 1024. Extra arguments are config overrides, e.g. data.root=/data/imagenet supernet.epochs=100.
#
#   NODES=2 PARTITION=gpu bash slurm/vit_1.3G_train.sh data.root=/data/imagenet
#
# Submitting the same command again resumes from runs/vitas-deit-1.3G/supernet/last.pth.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-1}
GPUS=${GPUS_PER_NODE:-8}
CPUS=${CPUS_PER_TASK:-10}
PARTITION_ARG=()
if [ -n "${PARTITION:-}" ]; then PARTITION_ARG=(--partition "$PARTITION"); fi

mkdir -p runs/vitas-deit-1.3G
sbatch "${PARTITION_ARG[@]}" --job-name=vit_1.3G_supernet \
    --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS" \
    --time=72:00:00 --output=runs/vitas-deit-1.3G/slurm-%x-%j.out \
    slurm/train-supernet.sbatch -c yamls/vitas-deit-1.3G.yaml "$@"
