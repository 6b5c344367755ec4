"""Train the demo MIM model: a masked autoencoder (He et al. 2022) on the demo recipe.

75% of the patches are masked at random (``--mask-ratio``), the encoder (the shared demo ViT) sees the
rest with the cls token, a light decoder (4 blocks x 128 by default) reconstructs the masked patches, and
the loss is the mean squared error against the pixels as the encoder sees them (``--pixel-target raw``, the
default, so that the high-contrast item weighs more than the low-contrast clutter around it;
``normalised``: against per-patch normalised pixels, MAE's ImageNet recipe, which left the demo encoder at
a random network's level). The defaults are the shipped ``demo:mae``'s recipe; its command (model card):

    python examples/train_mae.py --images-seen 1200000 --batch-size 256 --device cpu --checkpoint-dir DIR

The checkpoint is saved in MAE's own layout, ``{'model': state_dict}`` with the decoder keys, in float16.

With ``--checkpoint-dir DIR`` the run is resumable (``--resume``) and logs its loss to ``DIR/loss.jsonl``
(see ``training_run.py``).
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
from demo_data import TrainingStream, cosine_schedule, normalize
from training_run import TrainingRun, add_run_arguments, check_run_arguments


PIXEL_TARGETS = ("normalised", "raw")  # MAE's norm_pix_loss True / False


class MaskedAutoencoder(nn.Module):
    def __init__(self, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 4, decoder_heads: int = 2,
                 pixel_target: str = "raw"):
        super().__init__()
        if pixel_target not in PIXEL_TARGETS:
            raise ValueError(f"pixel_target must be one of {PIXEL_TARGETS}, not {pixel_target!r}")
        self.pixel_target = pixel_target
        self.encoder = create_demo_vit()
        self.mask_ratio = mask_ratio
        width, num_patches = self.encoder.embed_dim, self.encoder.patch_embed.num_patches
        if not 1 <= int(num_patches * (1 - mask_ratio)) < num_patches:
            raise ValueError(f"mask ratio {mask_ratio} must leave at least one of the {num_patches} patches visible "
                             "and mask at least one")
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
        if self.pixel_target == "normalised":
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
    add_run_arguments(p, out="mae.pth")
    p.add_argument("--base-lr", type=float, default=3e-4, help="per 256 images, as in MAE")
    p.add_argument("--decoder-depth", type=int, default=4, help="decoder blocks (MAE's linear probe is sensitive to it)")
    p.add_argument("--decoder-dim", type=int, default=128, help="decoder width")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="the share of the patches masked")
    p.add_argument("--pixel-target", choices=PIXEL_TARGETS, default="raw",
                   help="reconstruct the raw input pixels or per-patch normalised pixels (MAE's ImageNet default)")
    args = p.parse_args()
    device = check_run_arguments(p, args)

    torch.manual_seed(args.seed)
    stream = TrainingStream(device, args.seed, root=args.data_root)
    try:
        model = MaskedAutoencoder(mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                                  decoder_depth=args.decoder_depth, pixel_target=args.pixel_target).to(device)
    except ValueError as e:
        p.error(f"--mask-ratio {args.mask_ratio}: {e}")
    peak = args.base_lr * args.batch_size / 256
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.05)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    run = TrainingRun("train_mae.py", args, device, max(1, args.images_seen // args.batch_size),
                      modules={"model": model}, optimizer=optimizer, generators={"stream": stream.generator})
    for step in run:
        lr = cosine_schedule(step, run.steps, peak, warmup=max(1, run.steps // 20))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with amp:
            loss = model(normalize(stream.batch(args.batch_size)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.record(loss, lr)
    if not run.complete:
        run.exit_incomplete()
    record = {
        "recipe": f"MAE, mask ratio {args.mask_ratio}, decoder {args.decoder_depth}x{args.decoder_dim}, "
                  f"{args.pixel_target}-pixel loss, AdamW (0.9, 0.95) wd 0.05, cosine",
        **run.summary(),
    }
    torch.save({"model": model.checkpoint_state(), "training": record}, args.out)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
