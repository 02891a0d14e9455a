#!/usr/bin/env bash
# Multi-node (or multi-GPU) training with torchrun. Run the same command on every node, with its own
# NODE_RANK; the config and any --group.option come after the script's name:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 PROCS_PER_NODE=4 launch/torchrun.sh --config configs/paper_siglip_vq.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 PROCS_PER_NODE=4 launch/torchrun.sh --config configs/paper_siglip_vq.yaml
# Lightning reads torchrun's environment; the trainer's num_nodes, devices and strategy are set from
# these variables after the config, so they always agree with what torchrun started.
# ACCELERATOR=cpu runs the same job on CPUs (gloo), as tests/test_launch.py does on one machine.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PROCS_PER_NODE=${PROCS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATOR=${ACCELERATOR:-gpu}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$PROCS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m unified_vlm fit "$@" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$PROCS_PER_NODE" --trainer.accelerator "$ACCELERATOR" \
  --trainer.strategy "${STRATEGY:-ddp}"
