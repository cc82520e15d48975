#!/usr/bin/env bash
# Retraining the architecture searched in the ViTAS 1.3G-MACs space, in the manner of ViTAS's
# per-budget scripts: NODES nodes x 8 GPUs, one task per GPU, DeiT recipe for 300 epochs (AdamW,
# global batch 1024, lr 1e-3 = 5e-4 x 1024/512, cosine, warm-up 5, weight decay 0.05, drop path 0.1,
# RandAugment, Mixup/CutMix, label smoothing, EMA). The config is the search's retrain.yaml
# (retrain.arch -> search/arch.json) when it exists, else yamls/vitas-deit-1.3G.yaml, which reads
# runs/vitas-deit-1.3G/search/arch.json. RETOKENIZE=1 adds As-ViT's progressive re-tokenization
# (Table 6: 4x fewer tokens per side for epochs 1-80, 2x for 81-140, full from 141 on). Extra
# arguments are config overrides, e.g. data.root=/data/imagenet retrain.init=supernet.
#
#   PARTITION=gpu bash slurm/vit_1.3G_retrain.sh data.root=/data/imagenet
#   vitas evaluate --checkpoint runs/vitas-deit-1.3G/retrain/last.pth --data /data/imagenet
#
# Submitting the same command again resumes from runs/vitas-deit-1.3G/retrain/last.pth.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-1}
GPUS=${GPUS_PER_NODE:-8}
CPUS=${CPUS_PER_TASK:-10}
PARTITION_ARG=()
if [ -n "${PARTITION:-}" ]; then PARTITION_ARG=(--partition "$PARTITION"); fi
CONFIG=runs/vitas-deit-1.3G/search/retrain.yaml
if [ ! -f "$CONFIG" ]; then CONFIG=yamls/vitas-deit-1.3G.yaml; fi
EXTRA=()
if [ "${RETOKENIZE:-0}" = 1 ]; then EXTRA+=("retrain.retokenize=[[0, 4], [80, 2], [140, 1]]"); fi

mkdir -p runs/vitas-deit-1.3G
sbatch "${PARTITION_ARG[@]}" --job-name=vit_1.3G_retrain \
    --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --cpus-per-task="$CPUS" \
    --time=72:00:00 --output=runs/vitas-deit-1.3G/slurm-%x-%j.out \
    slurm/retrain.sbatch -c "$CONFIG" \
    retrain.epochs=300 retrain.batch_size=1024 retrain.lr=1e-3 retrain.warmup_epochs=5 \
    retrain.weight_decay=0.05 retrain.drop_path=0.1 retrain.ema=true "${EXTRA[@]}" "$@"
