"""What attnflow knows about timm's Vision Transformer architectures: the one module that reads timm internals.

Capture, the token layout, preprocessing, checkpoint loading and ``attnflow models`` need the same few facts
about a model: where its tokens sit, how many blocks and heads it has and how wide it is, which module's
output is each block's post-softmax attention, and what each block adds to the residual stream. A
:class:`ModelAdapter` answers them for one model. There is one adapter class per timm model family
(:class:`VisionTransformerAdapter`, :class:`EvaAdapter`, :class:`BeitAdapter`) and one :class:`BlockFamily`
per kind of transformer block; :func:`adapter_for` finds a model's adapter by its class and refuses any other
model with one line that names it.

Adding an architecture: declare a :class:`BlockFamily` for each new kind of block (the module that computes
the attention, the module whose output is the attention branch's update), subclass :class:`ModelAdapter`
with the model classes and block families (override the layout properties when the model keeps its tokens
differently from timm's ``VisionTransformer``, and :meth:`ModelAdapter.convert_checkpoint` for checkpoint
layouts timm's own filter does not convert), add it to :data:`ADAPTERS`, and give it a small random-init
build in ``tests/test_adapters.py`` (a test fails until every class ``attnflow models`` lists has one).
"""
from __future__ import annotations

import functools
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import timm
import torch
import torch.nn as nn
from timm.layers import Attention, AttentionRope, LayerScale, PatchEmbed
from timm.models import beit, eva, model_entrypoint, vision_transformer
from timm.models.naflexvit import NaFlexVit

from .checkpoint import StateDict
from .errors import AttnflowError

__all__ = [
    "Finish", "BlockFamily", "EVA_ATTENTION", "VIT_BLOCK", "VIT_RESPOST_BLOCK", "VIT_PARALLEL_BLOCK", "EVA_BLOCK",
    "EVA_POST_NORM_BLOCK", "BEIT_BLOCK", "Signature", "ModelAdapter", "VisionTransformerAdapter", "EvaAdapter",
    "BeitAdapter", "ADAPTERS", "REFUSED", "supported_names", "architecture_problem", "adapter_for", "timm_signature",
]

Finish = Callable[[torch.Tensor], torch.Tensor]


def _unchanged(out: torch.Tensor) -> torch.Tensor:
    return out


def _scaled_by(scale: torch.Tensor | None) -> Finish:
    """Multiply by a layer-scale vector (D,), or leave as is without one."""
    if scale is None:
        return _unchanged
    return lambda out: out * scale.detach()


def _no_problem(block: nn.Module) -> str | None:
    return None


@dataclass(frozen=True)
class BlockFamily:
    """How one kind of transformer block computes attention and adds it to the residual stream.

    Every block takes the residual stream (B, T, D) as its first argument.

    Attributes:
        name: how messages name the block kind.
        block_types: the timm block classes of this kind (subclasses included).
        attention_types: the attention module classes these blocks may hold; another one (differential
            attention, say) is refused. For blocks that compute attention inline, the block classes.
        attention: block -> the module that owns the ``fused_attn`` switch and ``num_heads`` and whose
            explicit (unfused) path applies its ``attn_drop`` module to the post-softmax map (B, H, T, T).
        branch_update: block -> ``(module, finish)``: ``finish(module's output)`` is exactly the (B, T, D)
            update the attention branch adds to the residual stream, after the output projection and layer
            scale (the numerator of the magnitude).
        problem: block -> why this block, although of this kind, cannot be captured; None when it can.
        unscaled_update: block -> ``(module, finish)`` as ``branch_update``, but the update before the layer
            scale (after the output projection); None for blocks without a layer scale, whose update is
            ``branch_update``'s.
    """

    name: str
    block_types: tuple[type[nn.Module], ...]
    attention_types: tuple[type[nn.Module], ...]
    attention: Callable[[nn.Module], nn.Module]
    branch_update: Callable[[nn.Module], tuple[nn.Module, Finish]]
    problem: Callable[[nn.Module], str | None] = _no_problem
    unscaled_update: Callable[[nn.Module], tuple[nn.Module, Finish]] | None = None

    def describe(self) -> str:
        """``'Block with Attention'``; just the name for blocks that compute attention inline."""
        if self.attention_types == self.block_types:
            return self.name
        return f"{self.name} with {'/'.join(t.__name__ for t in self.attention_types)}"


def _attention_submodule(block: nn.Module) -> nn.Module:
    return block.attn


def _output_of(name: str) -> Callable[[nn.Module], tuple[nn.Module, Finish]]:
    """The branch update is the output of the block's submodule ``name`` as it is (ls1, or a post-norm)."""
    return lambda block: (getattr(block, name), _unchanged)


def _attention_output(block: nn.Module) -> tuple[nn.Module, Finish]:
    # the attention module's output is after its output projection and before any layer scale
    return block.attn, _unchanged


def _gamma_1_times_attention(block: nn.Module) -> tuple[nn.Module, Finish]:
    # x + gamma_1 * attn(norm1(x)): the layer scale is a bare parameter, not a module to hook
    return block.attn, _scaled_by(block.gamma_1)


def _parallel_attention_update(block: nn.Module) -> tuple[nn.Module, Finish]:
    # x + ls(attn_out_proj(a) + mlp_out_proj(m)): LayerScale is elementwise, so the attention's share is
    # ls(attn_out_proj(a))
    return block.attn_out_proj, _scaled_by(block.ls.gamma if isinstance(block.ls, LayerScale) else None)


def _fused_output_projection(block: nn.Module) -> str | None:
    if block.attn_out_proj is None:
        return (
            "projects attention and MLP outputs with one fused matrix (fuse_out_proj), so the attention "
            "branch's update cannot be separated"
        )
    return None


# Each attention class below was checked in timm's source: with fused_attn off it computes softmax(q k^T *
# scale + bias) and passes it through attn_drop (identity in eval mode) before multiplying with v.
EVA_ATTENTION = (eva.EvaAttention, AttentionRope)
VIT_BLOCK = BlockFamily(
    "Block", (vision_transformer.Block,), (Attention,), _attention_submodule, _output_of("ls1"),
    unscaled_update=_attention_output,
)
VIT_RESPOST_BLOCK = BlockFamily(
    "ResPostBlock", (vision_transformer.ResPostBlock,), (Attention,), _attention_submodule, _output_of("norm1")
)
VIT_PARALLEL_BLOCK = BlockFamily(
    "ParallelScalingBlock",
    (vision_transformer.ParallelScalingBlock,),
    (vision_transformer.ParallelScalingBlock,),  # computes its attention inline
    lambda block: block,
    _parallel_attention_update,
    _fused_output_projection,
    unscaled_update=_output_of("attn_out_proj"),
)
EVA_BLOCK = BlockFamily(
    "EvaBlock", (eva.EvaBlock,), EVA_ATTENTION, _attention_submodule, _gamma_1_times_attention,
    unscaled_update=_attention_output,
)
EVA_POST_NORM_BLOCK = BlockFamily(
    "EvaBlockPostNorm", (eva.EvaBlockPostNorm,), EVA_ATTENTION, _attention_submodule, _output_of("norm1")
)
# BEiT's attention adds the relative position bias (its own table and/or the model's shared one) before the softmax.
BEIT_BLOCK = BlockFamily(
    "Block", (beit.Block,), (beit.Attention,), _attention_submodule, _gamma_1_times_attention,
    unscaled_update=_attention_output,
)


class Signature(NamedTuple):
    """The classes that decide whether and how attnflow captures a model."""

    model: type[nn.Module]
    block: type[nn.Module]
    attention: type[nn.Module]  # the block's attention module, or the block itself when it computes attention inline


class ModelAdapter:
    """attnflow's view of one timm model: its tokens, blocks and heads, and the modules capture hooks.

    Subclasses declare :attr:`model_types` and :attr:`block_families`; the properties below read the
    attributes timm's ``VisionTransformer``, ``Eva`` and ``Beit`` share (``patch_embed``, ``cls_token``,
    ``num_prefix_tokens``, ``embed_dim``, ``blocks``, ``norm``). Construct through :func:`adapter_for`.
    """

    model_types: ClassVar[tuple[type[nn.Module], ...]]
    block_families: ClassVar[tuple[BlockFamily, ...]]
    # Keys that only this family's pre-training checkpoints carry and the encoder has no use for.
    training_only_keys: ClassVar[re.Pattern[str] | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks: list[nn.Module] = list(getattr(model, "blocks", None) or [])
        self._families = [self._family_of(block) for block in self.blocks]

    @classmethod
    def name(cls) -> str:
        return cls.model_types[0].__name__

    def _family_of(self, block: nn.Module) -> BlockFamily | None:
        for family in self.block_families:
            if isinstance(block, family.block_types) and isinstance(family.attention(block), family.attention_types):
                return family
        return None

    def problem(self) -> str | None:
        """Why attnflow cannot capture this model, worded to follow "'NAME' is"; None when it can."""
        kind = type(self.model).__name__
        if not self.blocks:
            return f"a {kind} without transformer blocks"
        for i, (block, family) in enumerate(zip(self.blocks, self._families)):
            if family is None:
                inner = getattr(block, "attn", None)
                what = type(block).__name__ + (f" with {type(inner).__name__}" if isinstance(inner, nn.Module) else "")
                known = ", ".join(f.describe() for f in self.block_families)
                return f"a {kind} whose block {i} is a {what}, which attnflow cannot capture (it captures {known})"
            why = family.problem(block)
            if why is not None:
                return f"a {kind} whose block {i} ({family.name}) {why}"
        heads = {int(self.attention(i).num_heads) for i in range(len(self.blocks))}
        if len(heads) > 1:
            return f"a {kind} whose blocks have different head counts ({sorted(heads)})"
        return None

    # --- sizes ---------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        """Heads per block (every block has the same number, see :meth:`problem`)."""
        return int(self.attention(0).num_heads)

    @property
    def width(self) -> int:
        """D, the width of the residual stream and of the tokens."""
        return int(self.model.embed_dim)

    @property
    def signature(self) -> Signature:
        return Signature(type(self.model), type(self.blocks[0]), type(self.attention(0)))

    # --- tokens and input ----------------------------------------------------------------------------------

    @property
    def has_cls(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: cls and register (or distillation) tokens."""
        return int(self.model.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch height and width in input pixels."""
        return tuple(int(p) for p in self.model.patch_embed.patch_size)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model was built for."""
        patch_embed = self.model.patch_embed
        height, width = (int(s) for s in patch_embed.img_size)
        return int(patch_embed.proj.in_channels), height, width

    @property
    def final_norm(self) -> nn.Module:
        """The norm ``forward_features`` applies to every token after the last block (``nn.Identity`` when
        the model normalises only after pooling)."""
        return self.model.norm

    # --- what capture hooks --------------------------------------------------------------------------------

    def attention(self, i: int) -> nn.Module:
        """Block ``i``'s attention: owns ``fused_attn`` (capture switches it off) and ``num_heads``."""
        return self._families[i].attention(self.blocks[i])

    def softmax_output(self, i: int) -> nn.Module:
        """The module whose forward output is block ``i``'s post-softmax map (B, H, T, T), rows are queries."""
        return self.attention(i).attn_drop

    def branch_update(self, i: int, *, before_layer_scale: bool = False) -> tuple[nn.Module, Finish]:
        """``(module, finish)``: ``finish(module's output)`` is the (B, T, D) update block ``i``'s attention
        branch adds to the residual stream, after the output projection and layer scale; with
        ``before_layer_scale``, the same update before the layer scale (the same for blocks without one)."""
        family = self._families[i]
        if before_layer_scale and family.unscaled_update is not None:
            return family.unscaled_update(self.blocks[i])
        return family.branch_update(self.blocks[i])

    # --- checkpoints -----------------------------------------------------------------------------------------

    def convert_checkpoint(self, state_dict: StateDict) -> StateDict:
        """Bring an encoder state dict (prefixes stripped) into the layout the model's timm module expects:
        drop :attr:`training_only_keys`, convert what timm's filter does not know (:meth:`_convert_layout`),
        then apply timm's own ``checkpoint_filter_fn`` (foreign layouts, position embeddings and bias tables
        resampled to the model's grid)."""
        if self.training_only_keys is not None:
            state_dict = {k: v for k, v in state_dict.items() if not self.training_only_keys.match(k)}
        state_dict = self._convert_layout(state_dict)
        timm_filter = self._timm_checkpoint_filter()
        return timm_filter(state_dict, self.model) if timm_filter is not None else state_dict

    def _convert_layout(self, state_dict: StateDict) -> StateDict:
        return state_dict

    def _timm_checkpoint_filter(self) -> Callable[[StateDict, nn.Module], StateDict] | None:
        # the filter of the module that defines the model's class, or of the nearest base class that has one
        for cls in type(self.model).__mro__:
            found = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
            if found is not None:
                return found
        return None


class VisionTransformerAdapter(ModelAdapter):
    """timm ``VisionTransformer`` and its subclasses: plain, qk-norm, layer scale, registers, no-cls
    global-average-pool, post-norm (``ResPostBlock``) and parallel (``ParallelScalingBlock``) blocks. DeiT's
    distillation token is a prefix token after cls, counted with the registers."""

    model_types = (vision_transformer.VisionTransformer,)
    block_families = (VIT_BLOCK, VIT_RESPOST_BLOCK, VIT_PARALLEL_BLOCK)

    def problem(self) -> str | None:
        embed = getattr(self.model, "patch_embed", None)
        if not isinstance(embed, PatchEmbed):
            return (
                f"a {type(self.model).__name__} with a {type(embed).__name__} patch embedding, whose tokens are "
                "not fixed pixel patches"
            )
        return super().problem()


class EvaAdapter(ModelAdapter):
    """timm ``Eva``: EVA-02, DINOv3 and the other RoPE ViTs (``EvaBlock``, ``EvaBlockPostNorm``)."""

    model_types = (eva.Eva,)
    block_families = (EVA_BLOCK, EVA_POST_NORM_BLOCK)


class BeitAdapter(ModelAdapter):
    """timm ``Beit``: BEiT and BEiT-v2, relative position bias per block and/or shared, ``gamma_1`` layer scale.

    Their official pre-training checkpoints (``{'model': ...}``) keep the relative position bias either per
    block or once, shared (``rel_pos_bias.relative_position_bias_table``), and carry the masked-image-modelling
    head (``lm_head``) and BEiT-v2's extra cls pre-training blocks (``cls_pt_layers``, ``cls_pt_norm``,
    ``cls_pt_lm_head``), which the encoder does not use.
    """

    model_types = (beit.Beit,)
    block_families = (BEIT_BLOCK,)
    training_only_keys = re.compile(r"^(lm_head|cls_pt_layers|cls_pt_norm|cls_pt_lm_head)\.")

    SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
    OWN_TABLE = re.compile(r"^blocks\.\d+\.attn\.relative_position_bias_table$")

    def _convert_layout(self, state_dict: StateDict) -> StateDict:
        """A shared bias table into a model whose blocks each have their own: each block gets it (added to
        the block's own table when the checkpoint has both, which is what the two biases sum to), as BEiT's
        fine-tuning code does. Tables per block cannot go into a model without them."""
        blocks_have_tables = all(block.attn.relative_position_bias_table is not None for block in self.blocks)
        own = [k for k in state_dict if self.OWN_TABLE.match(k)]
        if own and not blocks_have_tables:
            raise AttnflowError(
                f"it has a relative position bias table per block ({own[0]}), but the model's blocks have no "
                "table of their own"
            )
        shared = state_dict.get(self.SHARED_TABLE)
        if shared is None or self.model.rel_pos_bias is not None or not blocks_have_tables:
            return state_dict  # nothing to convert, or nowhere to put it: the strict key check names the key
        converted = {k: v for k, v in state_dict.items() if not k.startswith("rel_pos_bias.")}
        for i in range(len(self.blocks)):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            own_table = state_dict.get(key)
            converted[key] = shared.clone() if own_table is None else own_table + shared
        return converted


# Looked up by isinstance, so subclasses (DeiT's VisionTransformerDistilled) find their family's adapter.
# The order is the order messages list them in.
ADAPTERS: tuple[type[ModelAdapter], ...] = (BeitAdapter, VisionTransformerAdapter, EvaAdapter)

# timm model classes attnflow refuses on purpose, with the reason (worded to follow "'NAME' is").
REFUSED: dict[type[nn.Module], str] = {
    NaFlexVit: (
        "a NaFlexVit, whose patch grid follows each input's resolution rather than the model (variable-resolution "
        "patch sequences), so attnflow cannot fix its token layout"
    ),
}


def supported_names() -> str:
    """``'Beit, VisionTransformer and Eva'``: the model classes attnflow captures, for messages and help."""
    names = [adapter.name() for adapter in ADAPTERS]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _adapt(model: nn.Module) -> tuple[ModelAdapter | None, str | None]:
    for refused, why in REFUSED.items():
        if isinstance(model, refused):
            return None, why
    adapter_cls = next((a for a in ADAPTERS if isinstance(model, a.model_types)), None)
    if adapter_cls is None:
        return None, f"a {type(model).__name__}"
    adapter = adapter_cls(model)
    return adapter, adapter.problem()


def architecture_problem(model: nn.Module) -> str | None:
    """Why attnflow cannot capture ``model``, worded to follow "'NAME' is"; None when it can."""
    return _adapt(model)[1]


def adapter_for(model: nn.Module, name: str | None = None) -> ModelAdapter:
    """The adapter of ``model``; an AttnflowError naming the model (``name``, else "the model") and the
    supported classes when attnflow cannot capture it."""
    adapter, problem = _adapt(model)
    if problem is not None:
        who = f"'{name}'" if name else "the model"
        raise AttnflowError(f"{who} is {problem}; attnflow captures timm {supported_names()} models")
    return adapter


def _may_build_supported(module_name: str) -> bool:
    # A timm module can only build the classes it names; checking this first spares building every CNN.
    known = tuple(a for adapter in ADAPTERS for a in adapter.model_types)
    module = sys.modules.get(module_name)
    return module is not None and any(isinstance(v, type) and issubclass(v, known) for v in vars(module).values())


@functools.lru_cache(maxsize=None)
def timm_signature(arch: str) -> Signature | None:
    """The :class:`Signature` of timm architecture ``arch`` (no pretrained tag) when attnflow can capture it,
    else None (unknown, unsupported or not buildable).

    Read off a weightless build on the meta device with one block (block and attention classes do not vary
    with depth in timm's ViTs), or with all blocks for architectures that refuse a depth override: about
    10 ms per architecture.
    """
    try:
        entrypoint = model_entrypoint(arch)
    except RuntimeError:
        return None
    if not _may_build_supported(entrypoint.__module__):
        return None
    model = None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for overrides in ({"depth": 1}, {}):
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
                break
            except Exception:  # an architecture that takes no depth override, or cannot be built at all
                continue
    if model is None:
        return None
    adapter, problem = _adapt(model)
    return adapter.signature if problem is None else None
