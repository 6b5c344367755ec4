"""Capture the real post-softmax attention and the attention-branch magnitude of every block.

timm ViTs compute attention with ``F.scaled_dot_product_attention`` by default, which never materialises
the map: hook-based tools then silently see nothing. :class:`AttentionCapture` switches the fused path off
on the hooked model's own attention modules (not process-wide), hooks the module its architecture's adapter
names as the softmax output (the ``attn_drop`` the explicit path applies to the map, identity in eval mode;
see :mod:`attnflow.architectures`), and checks after every forward that each block delivered one map whose
rows sum to 1.

Captured quantities, per forward of a (B, C, H, W) batch with L blocks, heads H_ and T tokens:

- ``attn``: (B, L, H_, T, T) float32, rows are queries;
- ``magnitude``: (B, L, T) float32, ``||attention-branch update added to the residual|| / ||residual
  entering the block||`` per token, the update taken after the output projection and layer scale (or, with
  ``magnitude="before-layer-scale"``, before the layer scale, as the Beyond [cls] code takes it);
- ``token_norm``: (B, L, T) float32, the L2 norm of every token of every block's output (the residual
  stream after the block, before the model's final norm): what high-norm artifact tokens are found by;
- ``tokens``: (B, T, D), the last block's output before the model's final norm (as computed, not upcast);
- ``layer_tokens``: (B, S, T, D), the outputs of the S blocks ``token_layers`` names (default: the last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from .architectures import Finish, adapter_for
from .choices import StrEnum, choice_values
from .errors import AttnflowError

__all__ = [
    "ROW_SUM_TOLERANCE", "MagnitudeUpdate", "attention_problem", "resolve_blocks", "Captured", "AttentionCapture",
]

ROW_SUM_TOLERANCE = 1e-3
# Where the magnitude's update is taken (a cache's ``magnitude_update`` attribute): after the block's layer
# scale (what the residual stream receives) or before it (the Beyond [cls] code's).
class MagnitudeUpdate(StrEnum):
    after_layer_scale = "after-layer-scale"
    before_layer_scale = "before-layer-scale"


def attention_problem(attn: torch.Tensor, tolerance: float = ROW_SUM_TOLERANCE) -> tuple[str, tuple[int, ...]] | None:
    """What keeps ``attn`` (..., T) from being post-softmax attention, and where: ``None`` when every row is
    finite, non-negative and sums to 1 within ``tolerance``, else ``(what is wrong, index of the worst row)``.

    The one check of "is this a real attention map", shared by capture (float32 maps in flight) and every
    reader of a cache (stored maps, with a tolerance widened by the storage dtype's rounding). Row sums are
    taken in float32 at least; two passes over the data when all is well.
    """
    if attn.numel() == 0:
        return None
    sums = attn.sum(dim=-1, dtype=torch.float64 if attn.dtype == torch.float64 else torch.float32)
    deviation = (sums - 1).abs()
    worst = deviation.max().item()
    if not worst <= tolerance:  # also NaN and inf, which make their row's sum non-finite
        finite = torch.isfinite(sums)
        if not bool(finite.all()):
            flat = int((~finite).flatten().nonzero()[0])
            return "holds NaN or infinite values", _unravel(flat, sums.shape)
        return f"rows do not sum to 1 (max deviation {worst:.3g})", _unravel(int(deviation.flatten().argmax()), sums.shape)
    lowest = attn.amin().item()
    if lowest < 0:
        flat = int(attn.flatten().argmin())
        return f"holds negative values (min {lowest:.3g})", _unravel(flat, attn.shape)[:-1]
    return None


def resolve_blocks(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Blocks named 0-based or negative from the last (``-1`` the last) as increasing distinct 0-based blocks;
    ValueError when one is not a block of the ``num_layers``."""
    bad = [b for b in layers if not -num_layers <= b < num_layers]
    if not layers:
        raise ValueError("names no block")
    if bad:
        raise ValueError(f"block {bad[0]} is out of range for the model's {num_layers} blocks "
                         f"(0 to {num_layers - 1}, or -1 to -{num_layers} from the last)")
    return tuple(sorted({b % num_layers for b in layers}))


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


@dataclass
class Captured:
    attn: torch.Tensor  # (B, L, H, T, T) float32
    magnitude: torch.Tensor  # (B, L, T) float32
    tokens: torch.Tensor  # (B, T, D) last block output, before the final norm
    token_norm: torch.Tensor  # (B, L, T) float32 norms of every block's output tokens
    layer_tokens: torch.Tensor  # (B, S, T, D) outputs of the capture's token_layers, before the final norm


class AttentionCapture:
    """Context manager that hooks every transformer block of a timm ViT.

    Example::

        with AttentionCapture(model) as capture:
            model.forward_features(images)
            captured = capture.pop()   # Captured(attn=(B, L, H, T, T), magnitude=(B, L, T))

    Hooks are removed and each attention module's ``fused_attn`` flag is restored on exit. ``magnitude``
    (a :class:`MagnitudeUpdate`) says where the magnitude's update is taken: after the
    block's layer scale (what the residual stream receives) or before it. ``token_layers`` (0-based, negative
    from the last block) are the blocks whose output tokens ``layer_tokens`` holds, in increasing order.

    Each block's map is copied, as the block computes it, into one (B, L, H, T, T) buffer, so the model frees
    its own map as it would without capture. With ``reuse_buffer`` every forward pass writes into the same
    buffer, and the ``attn`` of a :meth:`pop` is valid only until the next forward: for a loop that consumes
    each batch first (``attnflow extract``). A fresh buffer per batch is too large for the allocator to
    recycle; on a CPU its page faults alone cost about 4% of a ViT-S forward pass.
    """

    def __init__(self, model: nn.Module, magnitude: str = MagnitudeUpdate.after_layer_scale, token_layers: Sequence[int] = (-1,),
                 reuse_buffer: bool = False):
        if magnitude not in choice_values(MagnitudeUpdate):
            raise ValueError(f"magnitude must be one of {', '.join(MagnitudeUpdate)}, not '{magnitude}'")
        self.adapter = adapter_for(model)  # refuses, in one line, a model attnflow cannot capture
        self.blocks = self.adapter.blocks
        self.token_layers = resolve_blocks(token_layers, len(self.blocks))
        self.before_layer_scale = magnitude == "before-layer-scale"
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_fused: list[bool] = []
        self.reuse_buffer = reuse_buffer
        self._attn_buffer: torch.Tensor | None = None
        self._clear()

    def __enter__(self) -> "AttentionCapture":
        self._clear()
        for i, block in enumerate(self.blocks):
            attention = self.adapter.attention(i)
            self._saved_fused.append(bool(attention.fused_attn))
            attention.fused_attn = False
            source, finish = self.adapter.branch_update(i, before_layer_scale=self.before_layer_scale)
            self._handles += [
                block.register_forward_pre_hook(self._residual_hook(i), with_kwargs=True),
                self.adapter.softmax_output(i).register_forward_hook(self._attn_hook(i)),
                source.register_forward_hook(self._update_hook(i, finish)),
                block.register_forward_hook(self._output_hook(i)),
            ]
        for b in sorted({*self.token_layers, len(self.blocks) - 1}):
            self._handles.append(self.blocks[b].register_forward_hook(self._tokens_hook(b)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for i, fused in enumerate(self._saved_fused):
            self.adapter.attention(i).fused_attn = fused
        self._saved_fused.clear()
        self._attn_buffer = None
        self._clear()

    def _clear(self) -> None:
        n = len(self.blocks)
        self._attn_count = [0] * n  # maps each block delivered since the last pop
        self._residual_norm: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._update_norm: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._output_norm: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._tokens: dict[int, list[torch.Tensor]] = {}  # block -> its outputs (one per forward)
        self._low_precision: torch.dtype | None = None

    # Hooks keep float32 copies. Under CUDA autocast the softmax itself runs in float32 (it is on autocast's
    # float32 list), so the map is the model's own float32 softmax; the residual and the update may be
    # bfloat16 and are upcast before their norms. A softmax computed in half precision is refused in pop().
    def _attn_hook(self, i: int):
        def hook(module, inputs, output):
            if output.dtype not in (torch.float32, torch.float64):
                self._low_precision = output.dtype
            self._attn_count[i] += 1
            self._maps_buffer(output, i)[:, i].copy_(output.detach())

        return hook

    def _residual_hook(self, i: int):
        def hook(module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            residual = args[0] if args else kwargs["x"]  # every block family takes the residual stream first
            self._residual_norm[i].append(residual.detach().float().norm(dim=-1))

        return hook

    def _update_hook(self, i: int, finish: Finish):
        def hook(module, inputs, output):
            self._update_norm[i].append(finish(output.detach().float()).norm(dim=-1))

        return hook

    def _output_hook(self, i: int):
        def hook(module, inputs, output):
            self._output_norm[i].append(output.detach().float().norm(dim=-1))

        return hook

    def _tokens_hook(self, block: int):
        def hook(module, inputs, output):
            self._tokens.setdefault(block, []).append(output.detach())

        return hook

    def _maps_buffer(self, attn: torch.Tensor, block: int) -> torch.Tensor:
        """The (B, L, H, T, T) buffer that block ``block``'s map ``attn`` (B, H, T, T) goes into: float32 (float64
        for a float64 model), made anew when there is none or its shape, dtype or device differ."""
        shape = (attn.shape[0], len(self.blocks), *attn.shape[1:])
        dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
        buffer = self._attn_buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != attn.device:
            if block != 0 and buffer is not None:  # block 0 of this forward pass made it
                raise AttnflowError(f"block {block}'s attention has shape {tuple(attn.shape)}, block 0's "
                                    f"{(buffer.shape[0], *buffer.shape[2:])}: capture needs one shape for every block")
            self._attn_buffer = buffer = torch.empty(shape, dtype=dtype, device=attn.device)
        return buffer

    def pop(self) -> Captured:
        """Return what the last forward captured and reset; raise if any block did not deliver exactly once."""
        try:
            for name, counts in (("attention", self._attn_count), ("residual", list(map(len, self._residual_norm))),
                                 ("update", list(map(len, self._update_norm))), ("output", list(map(len, self._output_norm)))):
                if any(c != 1 for c in counts):
                    bad = [i for i, c in enumerate(counts) if c != 1]
                    raise AttnflowError(
                        f"expected one {name} capture per block per forward, got {counts} "
                        f"(blocks {bad}); was the model run more or less than once, or is attention fused?"
                    )
            if self._low_precision is not None:
                raise AttnflowError(
                    f"the attention softmax ran in {self._low_precision}, not float32 (CPU autocast or a "
                    "half-precision model): capture needs float32 maps; use CUDA autocast or a float32 model"
                )
            attn = self._attn_buffer
            if not self.reuse_buffer:
                self._attn_buffer = None  # the caller owns it now
            if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
                raise AttnflowError(f"captured attention has shape {tuple(attn.shape)}, expected (B, L, H, T, T)")
            problem = attention_problem(attn)
            if problem is not None:
                raise AttnflowError(f"captured attention {problem[0]}: the hooked tensor is not a post-softmax map")
            residual = torch.stack([x[0] for x in self._residual_norm], dim=1)
            update = torch.stack([x[0] for x in self._update_norm], dim=1)
            token_norm = torch.stack([x[0] for x in self._output_norm], dim=1)
            last = self._tokens[len(self.blocks) - 1][-1]
            # one block (the default): a view, no copy
            layer_tokens = torch.stack([self._tokens[b][-1] for b in self.token_layers], dim=1) if len(self.token_layers) > 1 \
                else self._tokens[self.token_layers[0]][-1][:, None]
            return Captured(attn=attn, magnitude=update / residual, tokens=last, token_norm=token_norm, layer_tokens=layer_tokens)
        finally:
            self._clear()
