"""Which tensors WUDI solves, and in which orientation (plain Python).

WUDI is defined on linear-layer weights ``[out, in]`` (``y = W x``). Everything else
falls back to task arithmetic. Being 2-D is not enough: embeddings (token,
position, token-type) and vocabulary projections are 2-D tables, not layers whose
rows see the same inputs. The authors' LLM code leaves ``lm_head`` out too.
"""

import re
from enum import Enum
from typing import Optional, Sequence


class ApplyWudi(str, Enum):
    AUTO = "auto"  # the rule below
    ALWAYS = "always"  # any 2-D tensor (e.g. opt lm_head in)
    NEVER = "never"  # task arithmetic


class Layout(str, Enum):
    AUTO = "auto"  # GPT-2 Conv1D names are [in, out], all else [out, in]
    OUT_IN = "out_in"  # torch.nn.Linear
    IN_OUT = "in_out"  # transformers' Conv1D


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


def is_linear_weight(name: Optional[str], vocabulary_axis: Optional[int]) -> bool:
    """The default rule for a 2-D tensor; an unnamed 2-D tensor counts as linear."""
    if vocabulary_axis is not None:
        return False
    if name is None:
        return True
    segments = name.split(".")
    if not segments[-1].endswith("weight"):
        return False
    return not any(_NOT_A_LINEAR_LAYER.search(segment) for segment in segments[:-1])


def wudi_layout(
    name: Optional[str],
    shape: Sequence[int],
    vocabulary_axis: Optional[int],
    apply_wudi: ApplyWudi = ApplyWudi.AUTO,
    layout: Layout = Layout.AUTO,
) -> Optional[Layout]:
    """The stored layout WUDI should read, or None for task arithmetic.

    Tensors that are not 2-D always fall back: the loss is defined on matrices.
    """
    if len(shape) != 2 or apply_wudi == ApplyWudi.NEVER:
        return None
    if apply_wudi == ApplyWudi.AUTO and not is_linear_weight(name, vocabulary_axis):
        return None
    if layout != Layout.AUTO:
        return layout
    return Layout.IN_OUT if name and _GPT2_CONV1D.search(name) else Layout.OUT_IN
