"""Train the demo JEA model: DINO self-distillation (Caron et al. 2021) on the demo recipe.

A student and an exponential-moving-average teacher (both the shared demo ViT plus a projection head)
see different random crops of the same composed image: two global 48 px crops for the teacher, the same
two plus four local 24 px crops for the student. The student matches the teacher's centred, sharpened
output distribution. The checkpoint is saved in DINO's own layout, ``{'teacher': ..., 'student': ...}``
with ``backbone.`` and ``module.backbone.`` prefixes, in float16:

    python examples/train_dino.py --images-seen 600000 --out attnflow/demo_data/dino.pth

With ``--checkpoint-dir DIR`` the run is resumable (``--resume``) and logs its loss to ``DIR/loss.jsonl``
(see ``training_run.py``).
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnflow.demo_models import create_demo_vit
from demo_data import TrainingStream, cosine_schedule, normalize
from training_run import TrainingRun, add_run_arguments, check_run_arguments


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 192, bottleneck: int = 64, out_dim: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        # weight-normalised last layer with its norm fixed to 1, as DINO's norm_last_layer=True
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = create_demo_vit(dynamic_img_size=True)  # local crops are 24 px
        self.head = DINOHead(self.backbone.embed_dim)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.head(self.backbone.forward_features(c)[:, 0]) for c in crops])


def random_resized_crops(images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(B, 48, 48) -> (B, size, size): per-sample random resized crop, horizontal flip and brightness /
    contrast jitter, done on the images' device with one affine grid."""
    B, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(B, generator=generator, device=device)

    area = uniform(*scale)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
    flip = torch.where(torch.rand(B, generator=generator, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, (B, 1, size, size), align_corners=False)
    crops = F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    jitter = torch.rand(B, generator=generator, device=device) < 0.8
    contrast = torch.where(jitter, uniform(0.6, 1.4), torch.ones(B, device=device))[:, None, None]
    brightness = torch.where(jitter, uniform(-0.2, 0.2), torch.zeros(B, device=device))[:, None, None]
    mean = crops.mean(dim=(1, 2), keepdim=True)
    return ((crops - mean) * contrast + mean + brightness).clamp(0, 1)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int, t_student: float, t_teacher: float) -> torch.Tensor:
    s = F.log_softmax(student / t_student, dim=-1).chunk(n_crops)
    t = F.softmax((teacher - center) / t_teacher, dim=-1).detach().chunk(2)
    pairs = [(i, v) for i in range(2) for v in range(n_crops) if v != i]
    return sum(-(t[i] * s[v]).sum(-1).mean() for i, v in pairs) / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, out="dino.pth")
    p.add_argument("--base-lr", type=float, default=5e-4, help="per 256 images, as in DINO")
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--teacher-momentum", type=float, default=0.99, help="EMA start (DINO's 0.996 is for runs 100x longer)")
    args = p.parse_args()
    device = check_run_arguments(p, args)

    torch.manual_seed(args.seed)
    stream = TrainingStream(device, args.seed, root=args.data_root)
    crop_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    student, teacher = Network().to(device), Network().to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    center = torch.zeros(1, student.head.last_layer.out_features, device=device)
    peak = args.base_lr * args.batch_size / 256
    optimizer = torch.optim.AdamW(student.parameters(), lr=peak, weight_decay=0.04)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_crops = 2 + args.local_crops
    run = TrainingRun("train_dino.py", args, device, max(1, args.images_seen // args.batch_size),
                      modules={"student": student, "teacher": teacher}, optimizer=optimizer, tensors={"center": center},
                      generators={"stream": stream.generator, "crops": crop_generator})
    for step in run:
        lr = cosine_schedule(step, run.steps, peak, final=1e-6, warmup=max(1, run.steps // 10))
        for group in optimizer.param_groups:
            group["lr"] = lr
        momentum = cosine_schedule(step, run.steps, args.teacher_momentum, final=1.0)
        images = stream.batch(args.batch_size)
        globals_ = [normalize(random_resized_crops(images, 48, (0.4, 1.0), crop_generator)) for _ in range(2)]
        locals_ = [normalize(random_resized_crops(images, 24, (0.1, 0.4), crop_generator)) for _ in range(args.local_crops)]
        with amp:
            with torch.no_grad():
                teacher_out = teacher(globals_).float()
            student_out = torch.cat([student(globals_), student(locals_)]).float() if locals_ else student(globals_).float()
            loss = dino_loss(student_out, teacher_out, center, n_crops, 0.1, 0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optimizer.step()
        with torch.no_grad():
            teacher_params, student_params = list(teacher.parameters()), [q.detach() for q in student.parameters()]
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
            center.mul_(0.9).add_(teacher_out.mean(0, keepdim=True), alpha=0.1)
        run.record(loss, lr, teacher_momentum=momentum)
    if not run.complete:
        run.exit_incomplete()
    record = {
        "recipe": f"DINO, 2x48px global + {args.local_crops}x24px local crops, head 192-192-64-512, student temp 0.1, teacher temp 0.04, "
                  "centre momentum 0.9, "
                  f"EMA {args.teacher_momentum}->1, AdamW wd 0.04, cosine",
        **run.summary(),
    }
    half = lambda net, prefix: {prefix + k: v.detach().half().cpu() for k, v in net.state_dict().items()}  # noqa: E731
    torch.save({"teacher": half(teacher, ""), "student": half(student, "module."), "training": record}, args.out)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
