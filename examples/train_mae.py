"""Train the demo MIM model: a masked autoencoder (He et al. 2022) on the demo recipe.

75% of the 64 patches are masked at random, the encoder (the shared demo ViT) sees the rest with the cls
token, a light decoder reconstructs the masked patches, and the loss is the mean squared error against
per-patch normalised pixels. The checkpoint is saved in MAE's own layout, ``{'model': state_dict}`` with
the decoder keys, in float16:

    python examples/train_mae.py --images-seen 600000 --out attnflow/demo_data/mae.pth
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from attnflow.demo_models import create_demo_vit
from demo_data import FASHION_MNIST, TrainingClock, TrainingStream, cosine_schedule, normalize


class MaskedAutoencoder(nn.Module):
    def __init__(self, mask_ratio: float = 0.75, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 2):
        super().__init__()
        self.encoder = create_demo_vit()
        self.mask_ratio = mask_ratio
        width, num_patches = self.encoder.embed_dim, self.encoder.patch_embed.num_patches
        self.patch = self.encoder.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio=2.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.decoder_pos_embed, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, P, patch * patch) in raster order, as the patch embedding reads them."""
        p = self.patch
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        B, P, _ = tokens.shape
        keep = int(P * (1 - self.mask_ratio))
        shuffle = torch.rand(B, P, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, tokens.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        latent = enc.norm(enc.blocks(torch.cat([cls, visible], dim=1)))

        d = self.decoder_embed(latent)
        patches = torch.cat([d[:, 1:], self.mask_token.expand(B, P - keep, -1)], dim=1)
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, d.shape[-1]))
        d = torch.cat([d[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            d = block(d)
        pred = self.decoder_pred(self.decoder_norm(d))[:, 1:]

        target = self.patchify(x)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(B, P, device=x.device)
        masked[:, :keep] = 0
        masked = torch.gather(masked, 1, restore)
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * masked).sum() / masked.sum()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """MAE's layout: encoder keys at the top level, decoder keys beside them."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        state.update(self.encoder.state_dict())
        return {k: v.detach().half().cpu() for k, v in state.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-seen", type=int, default=600_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--base-lr", type=float, default=1.5e-4, help="per 256 images, as in MAE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=str(FASHION_MNIST))
    p.add_argument("--max-seconds", type=float, help="train fewer steps if the first ones show the plan would take longer")
    p.add_argument("--out", default="mae.pth")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    stream = TrainingStream(device, args.seed, root=args.data_root)
    model = MaskedAutoencoder().to(device)
    steps = max(1, args.images_seen // args.batch_size)
    peak = args.base_lr * args.batch_size / 256
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.05)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    clock, step = TrainingClock(steps, args.max_seconds), 0
    while step < steps:
        steps = clock.tick(step)
        for group in optimizer.param_groups:
            group["lr"] = cosine_schedule(step, steps, peak, warmup=max(1, steps // 20))
        with amp:
            loss = model(normalize(stream.batch(args.batch_size)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            print(json.dumps({"step": step, "loss": round(losses[-1], 4), "seconds": round(clock.seconds, 1)}), flush=True)
        step += 1
    record = {
        "recipe": "MAE, mask ratio 0.75, decoder 2x64, normalised-pixel loss, AdamW (0.9, 0.95) wd 0.05, cosine",
        "images_seen": steps * args.batch_size, "batch_size": args.batch_size, "steps": steps, "seed": args.seed,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(clock.seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    torch.save({"model": model.checkpoint_state(), "training": record}, args.out)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
