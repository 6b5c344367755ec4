"""Where each kind of token sits in a ViT's sequence.

Every captured tensor and every metric is indexed by token; this small description is what tells a cls
token from a register from a patch, so that nothing downstream assumes "one cls token at index 0".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .architectures import adapter_for

__all__ = ["TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """Token order ``[cls (if any), registers..., patches in raster order]``.

    Attributes:
        has_cls: whether token 0 is a class token.
        num_prefix_tokens: cls plus register tokens, ``p``.
        grid_size: patch grid ``(rows, cols)``.
        patch_size: patch size in input pixels ``(height, width)``.
    """

    has_cls: bool
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.num_prefix_tokens < int(self.has_cls):
            raise ValueError("num_prefix_tokens must count the cls token")

    @property
    def num_registers(self) -> int:
        return self.num_prefix_tokens - int(self.has_cls)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    @classmethod
    def from_model(cls, model: nn.Module) -> "TokenLayout":
        """Read the layout off any model :mod:`attnflow.architectures` supports (its adapter says where the
        tokens sit); an unsupported model is an AttnflowError naming it."""
        adapter = adapter_for(model)
        return cls(
            has_cls=adapter.has_cls,
            num_prefix_tokens=adapter.num_prefix_tokens,
            grid_size=adapter.grid_size,
            patch_size=adapter.patch_size,
        )
