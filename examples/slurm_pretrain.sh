#!/bin/bash
# Pretrain with sslkit on a SLURM cluster, surviving time limits and preemption.
#
#   sbatch examples/slurm_pretrain.sh RECIPE [key.sub=value ...]
#   sbatch --nodes=2 examples/slurm_pretrain.sh recipes/dino_vit_small_imagenet.yaml data.root=/datasets/imagenet
#
# How it works:
# - `--signal=USR1@90` asks SLURM to send SIGUSR1 to every task 90 s before the time limit (and before a
#   preemption, where the cluster's grace time allows). sslkit lets the step in progress finish, writes
#   RUN/checkpoints/last.ckpt at that step and, since `trainer.requeue` is true by default, rank 0 runs
#   `scontrol requeue $SLURM_JOB_ID` once; the process exits with status 138.
# - `--requeue` lets the job be requeued (by that call, or by SLURM itself on preemption).
# - The requeued job runs this same script. `--resume auto` continues the newest run of the recipe's `name` in its
#   `output_dir` whose checkpoint loads, or starts a new run the first time. Keep `output_dir` on storage every node
#   sees. A run that already finished is left as it is, so a stray requeue after the end costs nothing.
# - 90 s must cover one training step plus writing a checkpoint; raise it for slow steps or very large models.
#
# One task per GPU: Lightning Fabric reads the ranks from srun, so trainer.devices must equal
# --ntasks-per-node and trainer.num_nodes must equal --nodes (set below from SLURM's own variables).

#SBATCH --job-name=sslkit-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch $0 RECIPE [key.sub=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift

echo "job ${SLURM_JOB_ID}, attempt $((${SLURM_RESTART_COUNT:-0} + 1)), ${SLURM_JOB_NUM_NODES} node(s) x ${SLURM_NTASKS_PER_NODE:?submit with --ntasks-per-node (one task per GPU)} task(s)"

# srun starts one task per GPU. SLURM sends the --signal to these tasks, not to this batch shell (that would be
# `--signal=B:USR1@90`). After `scontrol requeue` SLURM ends this job attempt (this shell included) and queues it
# again; nothing after srun is needed for the restart.
srun --kill-on-bad-exit=1 sslkit pretrain "$RECIPE" --resume auto \
  trainer.devices="${SLURM_NTASKS_PER_NODE}" trainer.num_nodes="${SLURM_JOB_NUM_NODES}" \
  data.num_workers="$((${SLURM_CPUS_PER_TASK:-4} - 1))" "$@"
