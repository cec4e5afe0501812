"""Which permutations of hidden units keep a transformer's function, read from its config.

A *group* is one permutation and every (parameter, axis) it moves. Permuting a
layer's output units together with the input columns of whatever consumes them
leaves the network's function unchanged; a group lists all of those places, so
applying it is exact. Groups of one model, in application order:

- ``residual``: one permutation of the hidden size shared by every layer
  (embedding columns, every norm's weight and bias, the input columns of every
  layer reading the stream, the output rows of every layer writing it, the head's
  columns). Norms are permutation-equivariant: only their entries move.
- ``layers.N.mlp``: the MLP's hidden units (gate and up rows, down's columns).
- ``layers.N.heads``: key/value heads move whole, with their group of query heads
  (GQA), and the value dimensions within each head (v rows, o columns) move by a
  per-head permutation: a two-level permutation over ``kv_heads * head_dim`` units.
- ``layers.N.query_heads`` (GQA only): query heads within their key/value group.
- ``layers.N.qk_dims`` (no RoPE only): query/key dimensions within a head, together.
  RoPE pairs dim i with i + d/2 at a fixed frequency, so under RoPE they stay.

A member's ``positions[u, c]`` is the axis position of copy c of unit u: applying
permutation ``p`` puts what was at ``positions[p[u], c]`` at ``positions[u, c]``.
Groups touching the same axis compose in list order (a later group permutes the
arrangement the earlier ones left). Pure Python and torch: nothing here imports
transformers; the config is read by attribute.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Key = Tuple[str, int]  # (parameter name, axis)
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_FAMILY + ("gpt2", "bert")


class UnsupportedModel(ValueError):
    """The model's architecture or layout is not one this tool can permute exactly."""


@dataclass(frozen=True)
class Member:
    """One (parameter, axis) a group moves; ``per_head``: positions are per head and
    move with the head-level part of a two-level permutation only."""

    key: Key
    positions: torch.Tensor  # long, (units or heads, copies)
    per_head: bool = False


@dataclass(frozen=True)
class Site:
    """Where a group's unit activations are observed: ``statistic`` names the hooked
    vector, stored in the order of parameter axis ``key``; ``positions`` as in Member."""

    statistic: str
    key: Key
    positions: torch.Tensor


@dataclass
class Group:
    name: str
    units: int
    members: List[Member]
    sites: List[Site]
    head_size: Optional[int] = None  # two-level: heads of this many units move whole
    block: Optional[int] = None  # the permutation stays within consecutive blocks
    layer: Optional[int] = None
    chain: str = ""  # groups of one chain are re-solved together, in order

    def head_permutation(self, permutation: torch.Tensor) -> torch.Tensor:
        return permutation.view(-1, self.head_size)[:, 0] // self.head_size

    def index(self, key: Key, length: int, permutation: torch.Tensor) -> torch.Tensor:
        """Gather index on axis ``key`` (new position p takes old index[p])."""
        index = torch.arange(length)
        for member in self.members:
            if member.key == key:
                moved = self.head_permutation(permutation) if member.per_head else permutation
                index[member.positions.flatten()] = member.positions[moved].flatten()
        return index

    def keys(self) -> List[Key]:
        return sorted({member.key for member in self.members})


@dataclass
class Structure:
    family: str
    groups: List[Group]
    # Hooked activation vectors: name -> [(module name, "input" | "output")]; several
    # modules feeding one name pool their tokens (the residual stream's sites).
    statistics: Dict[str, List[Tuple[str, str]]]
    shapes: Dict[str, Tuple[int, ...]]
    touching: Dict[Key, List[int]] = field(default_factory=dict)

    def __post_init__(self):
        for number, group in enumerate(self.groups):
            for key in group.keys():
                self.touching.setdefault(key, []).append(number)

    def identity(self) -> List[torch.Tensor]:
        return [torch.arange(group.units) for group in self.groups]

    def arrangement(self, permutations: Sequence[torch.Tensor], key: Key, before: Optional[int] = None):
        """Gather index of axis ``key`` after the groups (before group ``before``)."""
        index = torch.arange(self.shapes[key[0]][key[1]])
        for number in self.touching.get(key, ()):
            if before is not None and number >= before:
                break
            index = index[self.groups[number].index(key, len(index), permutations[number])]
        return index


def _column(length: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(length) + offset)[:, None]


@dataclass(frozen=True)
class Projection:
    """Where a head projection lives: its weight's output axis, its bias, the offset
    of its slice in a fused weight (GPT-2 c_attn), and the module whose output is it."""

    weight: str
    axis: int
    bias: Optional[str]
    offset: int
    module: str


def _attention_groups(
    layer: int, q: Projection, k: Projection, v: Projection, o_weight: str, o_axis: int,
    o_module: str, query_heads: int, kv_heads: int, head_dim: int, rope: bool,
) -> Tuple[List[Group], Dict[str, List[Tuple[str, str]]]]:
    g, d = query_heads // kv_heads, head_dim
    query = torch.arange(query_heads * d).view(kv_heads, g, d)
    fine = torch.arange(kv_heads * d).view(kv_heads, d)
    query_by_dim = query.permute(0, 2, 1).reshape(kv_heads * d, g)

    def rows(projection: Projection, positions: torch.Tensor, per_head: bool = False) -> List[Member]:
        keys = [(projection.weight, projection.axis)] + ([(projection.bias, 0)] if projection.bias else [])
        return [Member(key, positions + projection.offset, per_head) for key in keys]

    prefix = f"layers.{layer}"
    stats = {f"{prefix}.values": [(v.module, "output")]}
    groups = [Group(
        f"{prefix}.heads", kv_heads * d,
        rows(v, fine.reshape(-1, 1)) + [Member((o_weight, o_axis), query_by_dim)]
        + rows(k, fine, per_head=True) + rows(q, query.reshape(kv_heads, g * d), per_head=True),
        [Site(f"{prefix}.values", (v.weight, v.axis), fine.reshape(-1, 1) + v.offset)],
        head_size=d, layer=layer, chain=f"{prefix}.attention",
    )]
    if g > 1:
        per_query = torch.arange(query_heads * d).view(query_heads, d)
        stats[f"{prefix}.attention_output"] = [(o_module, "input")]
        groups.append(Group(
            f"{prefix}.query_heads", query_heads,
            rows(q, per_query) + [Member((o_weight, o_axis), per_query)],
            [Site(f"{prefix}.attention_output", (o_weight, o_axis), per_query)],
            block=g, layer=layer, chain=f"{prefix}.attention",
        ))
    if not rope:
        stats[f"{prefix}.queries"] = [(q.module, "output")]
        stats[f"{prefix}.keys"] = [(k.module, "output")]
        groups.append(Group(
            f"{prefix}.qk_dims", kv_heads * d,
            rows(k, fine.reshape(-1, 1)) + rows(q, query_by_dim),
            [Site(f"{prefix}.queries", (q.weight, q.axis), query_by_dim + q.offset),
             Site(f"{prefix}.keys", (k.weight, k.axis), fine.reshape(-1, 1) + k.offset)],
            block=d, layer=layer, chain=f"{prefix}.attention",
        ))
    return groups, stats


class _Builder:
    """Collects groups for one model, checking every named parameter exists."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], hidden: int):
        self.shapes, self.hidden = shapes, hidden
        self.residual: List[Member] = []
        self.groups: List[Group] = []
        self.statistics: Dict[str, List[Tuple[str, str]]] = {"residual": []}

    def require(self, name: str) -> str:
        if name not in self.shapes:
            raise UnsupportedModel(f"expected parameter {name!r} is missing")
        return name

    def optional(self, name: str) -> Optional[str]:
        return name if name in self.shapes else None

    def stream(self, *keys: Tuple[Optional[str], int]) -> None:
        """Parameter axes of the residual stream (``None`` names are skipped)."""
        for name, axis in keys:
            if name is not None:
                self.residual.append(Member((self.require(name), axis), _column(self.hidden)))

    def mlp(self, layer: int, produce: Sequence[Tuple[Optional[str], int]], consume: Key, module: str) -> None:
        units = self.shapes[self.require(consume[0])][consume[1]]
        members = [Member((n, a), _column(units)) for n, a in produce if n is not None]
        members.append(Member(consume, _column(units)))
        for member in members:
            self.require(member.key[0])
        name = f"layers.{layer}.mlp"
        self.statistics[name] = [(module, "input")]
        self.groups.append(Group(name, units, members, [Site(name, consume, _column(units))],
                                 layer=layer, chain=name))

    def attention(self, layer: int, **kwargs) -> None:
        groups, stats = _attention_groups(layer, **kwargs)
        for group in groups:
            for member in group.members:
                self.require(member.key[0])
        self.groups += groups
        self.statistics.update(stats)

    def build(self, family: str, permute_stream: bool = True) -> Structure:
        groups = list(self.groups)
        kept = set()
        if permute_stream:
            site = Site("residual", self.residual[0].key, _column(self.hidden))
            groups.insert(0, Group("residual", self.hidden, self.residual, [site], chain="residual"))
        else:
            del self.statistics["residual"]
            kept = {member.key[0] for member in self.residual}
        structure = Structure(family, groups, self.statistics, self.shapes)
        touched = {key[0] for key in structure.touching}
        unknown = [n for n in self.shapes if n not in touched | kept and not n.endswith(_UNTOUCHED_SUFFIXES)]
        if unknown:
            raise UnsupportedModel(f"parameters with an unknown layout: {', '.join(unknown[:5])}")
        return structure


# Parameters no permutation moves: per-head-dim norms (RoPE keeps q/k dims in
# place), vocabulary biases, BERT's pooler bias (the pooler's output is a model output).
_UNTOUCHED_SUFFIXES = ("q_norm.weight", "k_norm.weight", "predictions.bias", "decoder.bias", "pooler.dense.bias")


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is None:
        raise UnsupportedModel(f"config has none of {names}")
    return default


def _llama(config, shapes) -> Structure:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    build = _Builder(shapes, hidden)
    build.stream(("model.embed_tokens.weight", 1))
    for i in range(config.num_hidden_layers):
        a = f"model.layers.{i}."
        attention, mlp = a + "self_attn.", a + "mlp."
        proj = {n: Projection(attention + f"{n}_proj.weight", 0, build.optional(attention + f"{n}_proj.bias"), 0,
                              attention + f"{n}_proj") for n in "qkv"}
        build.stream(
            (a + "input_layernorm.weight", 0), (a + "post_attention_layernorm.weight", 0),
            *[(p.weight, 1) for p in proj.values()],
            (attention + "o_proj.weight", 0), (build.optional(attention + "o_proj.bias"), 0),
            (mlp + "gate_proj.weight", 1), (mlp + "up_proj.weight", 1),
            (mlp + "down_proj.weight", 0), (build.optional(mlp + "down_proj.bias"), 0),
        )
        build.statistics["residual"] += [(a + "input_layernorm", "input"), (a + "post_attention_layernorm", "input")]
        build.mlp(i, [(mlp + "gate_proj.weight", 0), (build.optional(mlp + "gate_proj.bias"), 0),
                      (mlp + "up_proj.weight", 0), (build.optional(mlp + "up_proj.bias"), 0)],
                  (mlp + "down_proj.weight", 1), mlp + "down_proj")
        build.attention(i, q=proj["q"], k=proj["k"], v=proj["v"], o_weight=attention + "o_proj.weight", o_axis=1,
                        o_module=attention + "o_proj", query_heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, rope=True)
    build.stream(("model.norm.weight", 0), (build.optional("lm_head.weight"), 1))
    build.statistics["residual"].append(("model.norm", "input"))
    return build.build(config.model_type)


def _gpt2(config, shapes) -> Structure:
    hidden, heads = config.n_embd, config.n_head
    build = _Builder(shapes, hidden)
    build.stream(("transformer.wte.weight", 1), ("transformer.wpe.weight", 1))
    for i in range(config.n_layer):
        a = f"transformer.h.{i}."
        fused, out = a + "attn.c_attn", a + "attn.c_proj"
        build.stream(
            (a + "ln_1.weight", 0), (a + "ln_1.bias", 0), (a + "ln_2.weight", 0), (a + "ln_2.bias", 0),
            (fused + ".weight", 0), (out + ".weight", 1), (out + ".bias", 0),  # Conv1D: [in, out]
            (a + "mlp.c_fc.weight", 0), (a + "mlp.c_proj.weight", 1), (a + "mlp.c_proj.bias", 0),
        )
        build.statistics["residual"] += [(a + "ln_1", "input"), (a + "ln_2", "input")]
        build.mlp(i, [(a + "mlp.c_fc.weight", 1), (a + "mlp.c_fc.bias", 0)], (a + "mlp.c_proj.weight", 0),
                  a + "mlp.c_proj")
        # q, k, v are consecutive slices of c_attn's output; the hooked vector is all three.
        proj = {n: Projection(fused + ".weight", 1, fused + ".bias", s * hidden, fused) for s, n in enumerate("qkv")}
        build.attention(i, q=proj["q"], k=proj["k"], v=proj["v"], o_weight=out + ".weight", o_axis=0,
                        o_module=out, query_heads=heads, kv_heads=heads, head_dim=hidden // heads, rope=False)
    build.stream(("transformer.ln_f.weight", 0), ("transformer.ln_f.bias", 0), (build.optional("lm_head.weight"), 1))
    build.statistics["residual"].append(("transformer.ln_f", "input"))
    return build.build("gpt2")


def _bert(config, shapes) -> Structure:
    hidden, heads = config.hidden_size, config.num_attention_heads
    prefix = "bert." if any(name.startswith("bert.") for name in shapes) else ""
    headless = "cls.predictions.decoder.weight" not in shapes
    build = _Builder(shapes, hidden)
    e = prefix + "embeddings."
    build.stream(*[(e + n, 1) for n in ("word_embeddings.weight", "position_embeddings.weight",
                                        "token_type_embeddings.weight")],
                 (e + "LayerNorm.weight", 0), (e + "LayerNorm.bias", 0))
    build.statistics["residual"].append((e + "LayerNorm", "output"))
    for i in range(config.num_hidden_layers):
        a = f"{prefix}encoder.layer.{i}."
        s = a + "attention.self."
        proj = {n: Projection(s + f"{m}.weight", 0, s + f"{m}.bias", 0, s + m)
                for n, m in (("q", "query"), ("k", "key"), ("v", "value"))}
        build.stream(
            *[(p.weight, 1) for p in proj.values()],
            (a + "attention.output.dense.weight", 0), (a + "attention.output.dense.bias", 0),
            (a + "attention.output.LayerNorm.weight", 0), (a + "attention.output.LayerNorm.bias", 0),
            (a + "intermediate.dense.weight", 1),
            (a + "output.dense.weight", 0), (a + "output.dense.bias", 0),
            (a + "output.LayerNorm.weight", 0), (a + "output.LayerNorm.bias", 0),
        )
        build.statistics["residual"] += [(a + "attention.output.LayerNorm", "output"), (a + "output.LayerNorm", "output")]
        build.mlp(i, [(a + "intermediate.dense.weight", 0), (a + "intermediate.dense.bias", 0)],
                  (a + "output.dense.weight", 1), a + "output.dense")
        build.attention(i, q=proj["q"], k=proj["k"], v=proj["v"], o_weight=a + "attention.output.dense.weight",
                        o_axis=1, o_module=a + "attention.output.dense", query_heads=heads, kv_heads=heads,
                        head_dim=hidden // heads, rope=False)
    build.stream((build.optional(prefix + "pooler.dense.weight"), 1))
    if not headless:
        # The MLM head's transform maps the stream to the (tied) decoder's input
        # space, which is the embedding's: both its axes follow the stream.
        t = "cls.predictions.transform."
        build.stream((t + "dense.weight", 0), (t + "dense.weight", 1), (t + "dense.bias", 0),
                     (t + "LayerNorm.weight", 0), (t + "LayerNorm.bias", 0), ("cls.predictions.decoder.weight", 1))
    # A headless encoder's output *is* the stream: permuting it would permute the
    # model's output, so its stream stays in place and only the layers' units move.
    return build.build("bert", permute_stream=not headless)


_FAMILIES: Dict[str, Callable] = {**{t: _llama for t in LLAMA_FAMILY}, "gpt2": _gpt2, "bert": _bert}


def read_structure(config, shapes: Dict[str, Tuple[int, ...]]) -> Structure:
    """The permutation groups of a model with ``config`` and parameter ``shapes``;
    UnsupportedModel naming the architecture when it is not one of SUPPORTED."""
    model_type = getattr(config, "model_type", None)
    architecture = (getattr(config, "architectures", None) or [model_type])[0]
    if model_type not in _FAMILIES:
        raise UnsupportedModel(
            f"architecture {architecture} (model_type {model_type!r}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED)}"
        )
    try:
        return _FAMILIES[model_type](config, dict(shapes))
    except UnsupportedModel as error:
        raise UnsupportedModel(f"architecture {architecture}: {error}") from None
