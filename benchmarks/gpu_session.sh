#!/usr/bin/env bash
# The GPU measurements issues 14 and 16 wait for, as one command for a device session (see benchmarks/README.md).
# Run from the repository root; results go to $OUT (or ./gpu-results). Parts, each sized for one call:
#   bash benchmarks/gpu_session.sh extract   # suite (ViT-B, bf16) and the 50,000-image ImageNet-val-sized run
#   bash benchmarks/gpu_session.sh probe     # probing 50,000 ViT-B-shaped token sets, every pool, on the GPU
set -euo pipefail
part=${1:?name a part: extract or probe}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
{ nvidia-smi -L; python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'; } | tee "$out/machine.txt"
case "$part" in
  extract)
    python3 benchmarks/suite.py --model vit_base_patch16_224 --n 4096 --batch-size 128 --workers "$workers" --device cuda --amp \
      --stores none,rows,full-float16 --full-n 512 --loop-n 512 --memory-n 1000,10000 2>&1 | tee "$out/suite.jsonl"
    python3 benchmarks/imagenet_val.py --n 50000 --model vit_base_patch16_224 --batch-size 128 --workers "$workers" --amp \
      --decode cpu,gpu 2>&1 | tee "$out/imagenet_val.jsonl"
    ;;
  probe)
    python3 benchmarks/probe_memory.py --time-pools 50000 --grid 14 14 --dim 768 --tokens-dtype float16 --device cuda \
      --repeats 1 --epochs 50 2>&1 | tee "$out/probe_gpu.jsonl"
    ;;
  *) echo "unknown part '$part': extract or probe" >&2; exit 2 ;;
esac
