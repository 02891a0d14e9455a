#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short script (about 5 minutes on one GPU): the CUDA test of
# the suite, then the tiny main config trained under FSDP (--trainer.strategy unified_fsdp, one
# rank) and scored from its checkpoint on one device, as the README describes.
#   bash launch/gpu_check.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PYTHON" -m pytest -q tests/test_unified_model.py -k cuda
"$PYTHON" -m unified_vlm fit --config configs/tiny_siglip_vq.yaml --trainer.accelerator gpu --trainer.devices 1 \
  --trainer.strategy unified_fsdp --trainer.precision bf16-mixed --trainer.max_steps 200 --trainer.val_check_interval 100 \
  --test_after_fit false --vqa_probe.max_records 0 --generation_probe.max_images 0 \
  --trainer.default_root_dir "$OUT/fsdp" --trainer.logger.init_args.save_dir "$OUT/fsdp"
"$PYTHON" -m unified_vlm test --config "$OUT/fsdp/version_0/config.yaml" --trainer.strategy auto \
  --ckpt_path "$OUT/fsdp/version_0/checkpoints/last.ckpt"
echo "gpu_check: done"
