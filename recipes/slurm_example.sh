#!/usr/bin/env bash
# SLURM example: N nodes x 8 GPUs, one `accelerate launch` per node (which starts the 8 GPU processes).
# sbatch --nodes=4 recipes/slurm_example.sh recipes/mocov3_vit_small_in1k.yaml data.path=/data/imagenet/train
#SBATCH --job-name=fastssl
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
# Preemption, scancel and the time limit send SIGTERM to every process: the trainer checkpoints within 10 steps
# (torchrun gives its processes 30 s) and prints how to continue: submit again with resume=<output_dir> added.
# --signal sends that SIGTERM 2 minutes before the time limit, so the steps since the last checkpoint are kept.
#SBATCH --signal=TERM@120
set -euo pipefail
RECIPE=${1:?usage: sbatch --nodes=N recipes/slurm_example.sh RECIPE.yaml [section.key=value ...]}
shift
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
srun bash -c "accelerate launch --config_file recipes/accelerate/multinode_8gpu.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
  tools/train.py $RECIPE $*"
