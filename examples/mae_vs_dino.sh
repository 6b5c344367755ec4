#!/usr/bin/env bash
# Capture a pretrained MAE and a pretrained DINO ViT-B/16 over the same ImageNet images.
# Needs internet (timm downloads the weights) and, for speed, a GPU.
#   bash examples/mae_vs_dino.sh /data/imagenet/val 1000
set -euo pipefail
images=${1:?usage: mae_vs_dino.sh IMAGENET_VAL_DIR [N]}
n=${2:-1000}
for model in vit_base_patch16_224.mae vit_base_patch16_224.dino; do
  attnflow extract "$model" "$images" -o "${model##*.}.h5" --limit "$n" --store rows --labels-from-dirs --amp
done
attnflow info mae.h5
