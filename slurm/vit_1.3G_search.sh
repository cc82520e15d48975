#!/usr/bin/env bash
# Architecture search in the ViTAS 1.3G-MACs space (yamls/vitas-deit-1.3G.yaml), in the manner of
# ViTAS's per-budget scripts: one node x 8 GPUs, one task per GPU, GA with population 50 for 20
# generations, MACs in [1.1G, 1.3G] (vitas's count: class token included, head on one token),
# scored by hold-out top-1 with weights inherited from runs/vitas-deit-1.3G/supernet/last.pth.
# Extra arguments are config overrides, e.g. data.root=/data/imagenet search.algorithm=nsga2.
#
#   PARTITION=gpu bash slurm/vit_1.3G_search.sh data.root=/data/imagenet
#
# Submitting the same command again continues from runs/vitas-deit-1.3G/search/last.pth. The result
# is runs/vitas-deit-1.3G/search/{arch.json,result.json,pareto.png,retrain.yaml}; retrain with
#   vitas retrain -c runs/vitas-deit-1.3G/search/retrain.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-1}
GPUS=${GPUS_PER_NODE:-8}
CPUS=${CPUS_PER_TASK:-10}
PARTITION_ARG=()
if [ -n "${PARTITION:-}" ]; then PARTITION_ARG=(--partition "$PARTITION"); fi

mkdir -p runs/vitas-deit-1.3G
sbatch "${PARTITION_ARG[@]}" --job-name=vit_1.3G_search \
    --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS" \
    --time=24:00:00 --output=runs/vitas-deit-1.3G/slurm-%x-%j.out \
    slurm/search.sbatch -c yamls/vitas-deit-1.3G.yaml \
    search.algorithm=ga search.population=50 search.generations=20 \
    search.macs_min=1100000000 search.macs_max=1300000000 "$@"
