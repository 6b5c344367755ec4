"""Model families: their names, how a timm pretrained tag maps to one, and how tables and figures show them.

A family is what ``attnflow compare`` groups models by (``--groups``) and what ``attnflow extract``
records in a cache (inferred from the pretrained tag, or ``--family``). Every other module takes the
names and their order from :data:`FAMILIES`; nothing else spells a family's tag rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Family", "FAMILY_DECLARATIONS", "FAMILIES", "MIM_TAG_WORDS", "JEA_TAG_WORDS", "AUTOREGRESSIVE_ARCH_WORDS",
    "LANGUAGE_ARCH_WORDS", "LANGUAGE_TAG_WORDS", "SUPERVISED_TAG_WORDS", "get_family", "title", "infer_family",
    "CHECKPOINT_CONTAINER_RULES", "CHECKPOINT_KEY_RULES", "checkpoint_family",
]


@dataclass(frozen=True)
class Family:
    """One family of models.

    Attributes:
        name: the value caches, metrics files, ``--family`` and ``--groups`` use.
        title: how tables, notes and verdicts name the family ("MIM cls attention more uniform").
        description: which pre-training it stands for, with examples.
        colormap: matplotlib colour map of the family's lines in ``attnflow plot curves``.
        linestyle: matplotlib line style of those lines.
    """

    name: str
    title: str
    description: str
    colormap: str
    linestyle: Any  # a matplotlib line style: a name such as "--" or a (offset, dashes) tuple


# In the order tables list them: self-supervised families first, then supervised ones, unknown last.
FAMILY_DECLARATIONS = (
    Family("mim", "MIM", "masked image modelling: MAE, SimMIM, BEiT-v2, I-JEPA, EVA-02 MIM", "Oranges", "-"),
    Family("jea", "JEA", "joint-embedding: DINO, DINOv2, DINOv3, iBOT, MoCo v3", "Blues", "--"),
    Family("autoregressive", "autoregressive", "autoregressive pre-training: AIMv2", "Purples", (0, (5, 1, 1, 1, 1, 1))),
    Family("language-supervised", "language-supervised", "image-text pre-training: CLIP, SigLIP, EVA-CLIP, PE",
           "Reds", (0, (1, 1))),
    Family("supervised", "supervised", "supervised on labels, or fine-tuned (*_ft_* tags)", "Greens", "-."),
    Family("untrained", "untrained", "random weights: the reference a trained model is read against (demo:random)",
           "Greys", (0, (3, 1, 1, 1))),
    Family("unknown", "unknown", "none of the above", "Greys", ":"),
)
FAMILIES = tuple(f.name for f in FAMILY_DECLARATIONS)
_BY_NAME = {f.name: f for f in FAMILY_DECLARATIONS}

# Tag rules, as words of the timm name (split at "_" and "-"): a pretrained tag's words, or the
# architecture's. Checked in the order of infer_family below; the first that matches decides.
MIM_TAG_WORDS = frozenset({"mae", "ijepa", "simmim", "beitv2", "mim"})
JEA_TAG_WORDS = frozenset({"dino", "dinov2", "dinov3", "ibot", "mocov3"})
AUTOREGRESSIVE_ARCH_WORDS = frozenset({"aimv2"})
LANGUAGE_ARCH_WORDS = frozenset({"clip", "siglip", "siglip2", "pe"})  # vit_*_clip_*, eva02_*_clip_*, vit_pe_core_*
LANGUAGE_TAG_WORDS = frozenset({
    "openai", "clip", "laion2b", "laion400m", "laiona", "datacompxl", "datacomp1b", "dfn2b", "dfn5b", "dfndr2b",
    "metaclip", "metaclip2", "mclip", "mclip2", "tinyclip", "webli", "merged2b", "yfcc15m", "cc12m",
})
SUPERVISED_TAG_WORDS = frozenset({"in1k", "in21k", "in22k", "in12k", "augreg", "orig", "sam"})


def get_family(name: str) -> Family:
    """The declaration of family ``name``; an unknown name is a ``KeyError`` naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown family '{name}' (choose from {', '.join(FAMILIES)})") from None


def title(name: str) -> str:
    """How tables and verdicts name family ``name`` (``MIM``, ``JEA``, ``language-supervised``, ...)."""
    return get_family(name).title


def _words(text: str) -> set[str]:
    return set(re.split(r"[_\-]", text)) - {""}


def infer_family(name: str, *, architecture: bool = True) -> str:
    """Family of a timm model name with its pretrained tag, e.g. ``vit_base_patch16_224.mae`` -> ``mim``.

    With ``architecture=False`` only the tag's words count: weights loaded from a checkpoint need not be
    what the architecture's name suggests (an MAE checkpoint fits ``vit_small_patch14_dinov2`` as well).

    Fine-tuned tags (``*_ft_*``) are supervised even when pre-training was MIM, JEA or image-text: the
    attention a researcher sees there is the classifier's. Then MIM tags (``mae``, ``ijepa``, EVA-02
    ``mim_*``...), JEA tags (``dino``, DINOv2/v3 architectures...), AIMv2 (autoregressive), image-text
    architectures or tags (``*_clip_*``, ``*_siglip_*``, ``vit_pe_*``, ``.openai``, ``.laion2b``,
    ``.webli``, ``.dfn5b``, ``.metaclip_*``, EVA-CLIP's ``.merged2b``...), supervised tags (``in1k``,
    ``augreg``...); anything else is ``unknown``.
    """
    arch, _, tag = name.lower().partition(".")
    if not architecture:
        arch = ""
    tag_words, arch_words = _words(tag), _words(arch)
    if "ft" in tag_words:
        return "supervised"
    if tag_words & MIM_TAG_WORDS:
        return "mim"
    if tag_words & JEA_TAG_WORDS or re.search(r"dinov[23]", arch):
        return "jea"
    if arch_words & AUTOREGRESSIVE_ARCH_WORDS:
        return "autoregressive"
    if arch_words & LANGUAGE_ARCH_WORDS or tag_words & LANGUAGE_TAG_WORDS:
        return "language-supervised"
    if tag_words & SUPERVISED_TAG_WORDS:
        return "supervised"
    return "unknown"


# What a pre-training checkpoint's own layout says about its objective: (family, what was seen), tried in
# order. Containers are the checkpoint's top-level keys; key patterns are matched against every tensor name
# of every container, so prefixes (``module.``, ``encoder.``) do not matter.
CHECKPOINT_CONTAINER_RULES = (
    (frozenset({"teacher", "student"}), "jea", "DINO/iBOT teacher and student"),
    (frozenset({"target_encoder"}), "mim", "I-JEPA target encoder"),
)
CHECKPOINT_KEY_RULES = (
    (re.compile(r"(^|\.)momentum_encoder\."), "jea", "MoCo v3 momentum encoder"),
    (re.compile(r"(^|\.)(decoder_embed|decoder_blocks|decoder_pred|decoder_pos_embed)[.]?"), "mim", "MAE decoder keys"),
    (re.compile(r"(^|\.)decoder\."), "mim", "SimMIM decoder keys"),
    (re.compile(r"(^|\.)(lm_head|cls_pt_layers)\."), "mim", "BEiT masked-token head"),
)


def checkpoint_family(checkpoint: Any) -> tuple[str, str] | None:
    """``(family, evidence)`` when a checkpoint's layout identifies its pre-training objective: DINO/iBOT's
    teacher and student, I-JEPA's target encoder, MoCo v3's momentum encoder, an MAE, SimMIM or BEiT decoder
    or masked-token head; None when it does not (a bare encoder state dict says nothing about how it was
    trained). ``checkpoint`` is the object read from the file (:func:`attnflow.checkpoint.read_checkpoint_file`)."""
    if not isinstance(checkpoint, dict):
        return None
    top = {str(k) for k in checkpoint}
    for containers, family, evidence in CHECKPOINT_CONTAINER_RULES:
        if containers <= top:
            return family, evidence
    names = list(_tensor_names(checkpoint))
    for pattern, family, evidence in CHECKPOINT_KEY_RULES:
        if any(pattern.search(n) for n in names):
            return family, evidence
    return None


def _tensor_names(obj: Any, prefix: str = "", depth: int = 0):
    """Dotted names of the leaves of nested dicts (at most three levels: containers, then a state dict)."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 3:
            yield from _tensor_names(value, name + ".", depth + 1)
        else:
            yield name
