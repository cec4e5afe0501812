"""Which tensors WUDI solves, and how each is viewed (plain Python, no torch).

WUDI is defined on linear-layer weights ``[out, in]`` (``y = W x``). Everything else
falls back to task arithmetic. Being 2-D is not enough: embeddings (token,
position, token-type) and vocabulary projections are 2-D tables, not layers whose
rows see the same inputs. The authors' LLM code leaves ``lm_head`` out too.

Mixture-of-experts models store their experts' linear weights fused, one 3-D
tensor per projection with the expert on axis 0 (``mlp.experts.gate_up_proj``
``[E, 2I, H]``). Each slice is one expert's linear weight, and expert e's slice
across the merged models is one WUDI problem, as a 2-D weight would be.

``tensor_fate`` is the one place that decides; the kernel and any tool that must
agree with the merge (a report) read it.
"""

import re
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence


class ApplyWudi(str, Enum):
    AUTO = "auto"  # the rule below
    ALWAYS = "always"  # any 2-D tensor (e.g. opt lm_head in), any 3-D one as a stack
    NEVER = "never"  # task arithmetic


class Layout(str, Enum):
    """How a matrix (or each matrix of a stack) is stored."""

    AUTO = "auto"  # by name: see tensor_fate
    OUT_IN = "out_in"  # torch.nn.Linear, F.linear(x, W)
    IN_OUT = "in_out"  # transformers' Conv1D, torch.bmm(x, W)


class Fallback(str, Enum):
    """Why a tensor gets task arithmetic instead of WUDI."""

    NEVER = "apply_wudi: never"
    NOT_A_MATRIX = "not a matrix or a stack of expert matrices"
    VOCABULARY_AXIS = "vocabulary axis"
    TABLE_OR_HEAD = "embedding, table or head"
    NOT_A_WEIGHT = "not a weight"


@dataclass(frozen=True)
class TensorFate:
    """What the merge does with one tensor.

    ``layout`` is the stored orientation of the matrix WUDI solves (of each slice,
    for a stack), or None for task arithmetic, in which case ``reason`` says why.
    ``stacked``: the tensor is a stack of matrices along axis 0, one per MoE expert,
    each solved on its own.
    """

    layout: Optional[Layout] = None
    stacked: bool = False
    reason: Optional[Fallback] = None

    @property
    def solved(self) -> bool:
        return self.layout is not None

    def describe(self) -> str:
        """``[out, in]``, ``expert slices [in, out]``, ``task arithmetic (vocabulary axis)``."""
        if not self.solved:
            return f"task arithmetic ({self.reason.value})"
        view = "[out, in]" if self.layout == Layout.OUT_IN else "[in, out]"
        return f"expert slices {view}" if self.stacked else view


# A dotted name segment that marks a lookup table (T5's relative_attention_bias is
# an embedding too) or an output head.
_NOT_A_LINEAR_LAYER = re.compile(
    r"(embed|bias|^wte$|^wpe$|^lm_head$|^shared$|^classifier$|^score$)", re.IGNORECASE
)
# transformers' GPT-2 Conv1D modules (weights stored [in, out]). OpenCLIP reuses
# c_fc/c_proj names for ordinary Linear layers, but under "resblocks", not "h.N".
_GPT2_CONV1D = re.compile(
    r"(^|\.)h\.\d+\.((attn|crossattention)\.(c_attn|q_attn|c_proj)|mlp\.(c_fc|c_proj))\.weight$"
)
# Fused expert stacks, as mergekit 0.1.5's architecture files name them: transformers
# 5's `experts.gate_up_proj` / `experts.down_proj` (Mixtral, Qwen3-MoE, GLM-4-MoE,
# Qwen3-VL-MoE, Llama 4) and Granite MoE's `block_sparse_moe.input_linear.weight` /
# `output_linear.weight`. (AFMoE's experts are separate 2-D weights: the 2-D rule.)
_EXPERT_STACK = re.compile(
    r"(^|\.)(experts\.[^.]+|block_sparse_moe\.(input|output)_linear\.weight)$"
)
# Llama 4's experts compute torch.bmm(x, W[e]): slices are [in, out].
_LLAMA4_EXPERTS = re.compile(r"(^|\.)feed_forward\.experts\.[^.]+$")
# Qwen3-VL-MoE files come in two layouts under the same names: as Qwen released
# them (and transformers 4 saved them) [E, H, 2I] / [E, I, H], and as transformers 5
# saves them [E, 2I, H] / [E, H, I]. transformers tells them apart by the model's
# shapes; from one tensor, only by taking the hidden size H as the larger side, as
# in every released Qwen3-VL-MoE (H 2048, I 768; H 4096, I 1536).
_QWEN3_VL_EXPERTS = re.compile(
    r"(^|\.)language_model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$"
)
# For the fallback warning: a projection inside a numbered layer.
_LOOKS_LINEAR = re.compile(r"\.\d+\..*(proj|fc|dense|linear)", re.IGNORECASE)


def _name_fallback(
    name: Optional[str], vocabulary_axis: Optional[int], stacked: bool
) -> Optional[Fallback]:
    if vocabulary_axis is not None:
        return Fallback.VOCABULARY_AXIS
    if name is None:
        return None
    segments = name.split(".")
    if any(_NOT_A_LINEAR_LAYER.search(segment) for segment in segments[:-1]):
        return Fallback.TABLE_OR_HEAD
    # Stacks are named by their module (`experts.down_proj`), matrices by parameter.
    if not stacked and not segments[-1].endswith("weight"):
        return Fallback.NOT_A_WEIGHT
    return None


def is_expert_stack(name: Optional[str]) -> bool:
    """A 3-D tensor of this name holds one linear weight per MoE expert, on axis 0."""
    return bool(name and _EXPERT_STACK.search(name))


def _auto_layout(name: Optional[str], shape: Sequence[int]) -> Layout:
    if not name:
        return Layout.OUT_IN
    if len(shape) == 2:
        return Layout.IN_OUT if _GPT2_CONV1D.search(name) else Layout.OUT_IN
    if _LLAMA4_EXPERTS.search(name):
        return Layout.IN_OUT
    qwen3_vl = _QWEN3_VL_EXPERTS.search(name)
    if qwen3_vl:
        rows, cols = shape[1], shape[2]
        hidden_axis = 1 if rows > cols else 2 if cols > rows else None
        # H is the input side of gate_up_proj and the output side of down_proj.
        in_axis_is_hidden = qwen3_vl.group(2) == "gate_up_proj"
        if hidden_axis == (1 if in_axis_is_hidden else 2):
            return Layout.IN_OUT
    return Layout.OUT_IN


def tensor_fate(
    name: Optional[str],
    shape: Sequence[int],
    vocabulary_axis: Optional[int],
    apply_wudi: ApplyWudi = ApplyWudi.AUTO,
    layout: Layout = Layout.AUTO,
) -> TensorFate:
    """What the merge does with the tensor ``name`` of this shape.

    ``auto``: 2-D linear weights (no name fallback; an unnamed 2-D tensor counts as
    one) and 3-D expert stacks (``is_expert_stack``) are solved; ``always``: every 2-D tensor, and every 3-D
    tensor as a stack of matrices along axis 0; ``never``: none. Tensors of any
    other rank always fall back: the loss is defined on matrices. ``layout``
    other than ``auto`` sets the stored orientation of every solved matrix;
    ``auto`` reads it from the name (GPT-2 ``Conv1D`` and Llama 4's experts are
    ``[in, out]``; Qwen3-VL-MoE's experts from the shape, see above).
    """
    if apply_wudi == ApplyWudi.NEVER:
        return TensorFate(reason=Fallback.NEVER)
    rank = len(shape)
    stacked = rank == 3 and (apply_wudi == ApplyWudi.ALWAYS or is_expert_stack(name))
    if rank != 2 and not stacked:
        return TensorFate(reason=Fallback.NOT_A_MATRIX)
    if apply_wudi == ApplyWudi.AUTO:
        reason = _name_fallback(name, vocabulary_axis, stacked)
        if reason is not None:
            return TensorFate(reason=reason)
    chosen = _auto_layout(name, shape) if layout == Layout.AUTO else layout
    return TensorFate(layout=chosen, stacked=stacked)


def looks_like_linear_layer(name: Optional[str], shape: Sequence[int]) -> bool:
    """A 2-D or 3-D ``*proj*`` / ``*fc*`` / ``*dense*`` / ``*linear*`` tensor inside a
    numbered layer: one that falls back to task arithmetic deserves a warning."""
    return len(shape) in (2, 3) and bool(name) and bool(_LOOKS_LINEAR.search(name))
