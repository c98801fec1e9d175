"""BlockMap: every parameter of a causal LM in exactly one group.

Groups are the decoder blocks (what the samplers choose among) and the
"always-train" groups around them: input embeddings (plus learned position
embeddings), the LM head, and everything else outside the blocks (final norm).
Tied embedding/head weights are one group: training one side trains the other.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from grass_cli.errors import ModelError

GroupKind = Literal["embed", "head", "norm", "block"]

# Attribute paths of the decoder ModuleList in common transformers causal LMs,
# tried before the generic search.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi3, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers
)


@dataclass
class ParamGroup:
    name: str  # "embed", "head", "norm", "block.3"
    kind: GroupKind
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    index: int | None = None  # block index for kind == "block"
    tied: bool = False  # embed group that also serves as the LM head

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def tensors(self) -> list[nn.Parameter]:
        return [p for _, p in self.params]

    def set_trainable(self, on: bool) -> None:
        for _, p in self.params:
            p.requires_grad_(on)


@dataclass
class BlockMap:
    blocks: list[ParamGroup]
    embed: ParamGroup | None
    head: ParamGroup | None  # None when tied to the embeddings
    norm: ParamGroup | None
    blocks_path: str

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def tied(self) -> bool:
        return self.embed is not None and self.embed.tied

    def groups(self) -> list[ParamGroup]:
        extra = [g for g in (self.embed, self.norm, self.head) if g is not None]
        return extra + self.blocks

    def by_name(self) -> dict[str, ParamGroup]:
        return {g.name: g for g in self.groups()}

    def always_train(self, embeddings: bool, norm: bool, head: bool) -> list[ParamGroup]:
        """The non-block groups switched on; a tied group trains if either side is on."""
        out: list[ParamGroup] = []
        if self.embed is not None and (embeddings or (self.embed.tied and head)):
            out.append(self.embed)
        if self.norm is not None and norm:
            out.append(self.norm)
        if self.head is not None and head:
            out.append(self.head)
        return out


def find_blocks(model: nn.Module, attr: str | None = None) -> tuple[nn.ModuleList, str]:
    """The ModuleList of decoder blocks, by explicit path, known paths, or search."""
    if attr:
        try:
            found = operator.attrgetter(attr)(model)
        except AttributeError:
            raise ModelError(
                f"the model has no attribute {attr!r}",
                where="model.blocks_attr",
                hint="set it to the dotted path of the decoder layers' ModuleList, "
                "or null to find it automatically",
            ) from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ModelError(
                f"{attr!r} is a {type(found).__name__}, not a non-empty ModuleList",
                where="model.blocks_attr",
            )
        return found, attr
    for path in KNOWN_BLOCK_PATHS:
        try:
            found = operator.attrgetter(path)(model)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found, path
    # Generic: the ModuleList holding the most parameters is the decoder stack.
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if best is None or n > best[0]:
                best = (n, name, module)
    if best is None:
        raise ModelError(
            f"cannot find the decoder blocks of {type(model).__name__}",
            where="model.blocks_attr",
            hint="set model.blocks_attr to the dotted path of its layers, e.g. model.layers",
        )
    return best[2], best[1]


def build_block_map(model: nn.Module, blocks_attr: str | None = None) -> BlockMap:
    """Partition the model's parameters into embed / norm / head / block groups."""
    layers, path = find_blocks(model, blocks_attr)
    owner: dict[int, str] = {}  # id(param) -> group name; dedupes tied weights
    blocks: list[ParamGroup] = []
    for i, layer in enumerate(layers):
        group = ParamGroup(name=f"block.{i}", kind="block", index=i)
        for name, p in layer.named_parameters(prefix=f"{path}.{i}"):
            if id(p) not in owner:
                owner[id(p)] = group.name
                group.params.append((name, p))
        blocks.append(group)

    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    tied = bool(embed_ids & head_ids)
    # Learned position embeddings (GPT-2's wpe) belong with the token embeddings.
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module is not in_emb:
            embed_ids |= {id(p) for p in module.parameters()}

    embed = ParamGroup(name="embed", kind="embed", tied=tied)
    head = ParamGroup(name="head", kind="head")
    norm = ParamGroup(name="norm", kind="norm")
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in owner:
            continue
        if id(p) in embed_ids:
            target = embed
        elif id(p) in head_ids:
            target = head
        else:
            target = norm
        owner[id(p)] = target.name
        target.params.append((name, p))
    return BlockMap(
        blocks=blocks,
        embed=embed if embed.params else None,
        head=head if head.params else None,
        norm=norm if norm.params else None,
        blocks_path=path,
    )
