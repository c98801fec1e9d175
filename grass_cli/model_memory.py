"""What the engine does to a loaded model to save memory: activation checkpointing
(always while probing) and sparse gradients for tied embeddings.

Apart from models.py (which loads models) because these change how a model
trains, not what it is; both are tested to leave the gradients unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in backward, with torch's non-reentrant checkpoint.

    Non-reentrant, because the reentrant variant yields no parameter gradients at all
    for a block whose input does not require grad (frozen embeddings and frozen
    blocks below it, the usual case in layer-wise training).

    transformers then also registers a hook that makes the embedding output require
    grad (a workaround only the reentrant variant needs). That hook is removed:
    with it, backward runs through every block below the lowest trainable one
    (recomputing their forward and computing activation gradients nobody uses),
    which throws away what layer-wise training saves when the active blocks are
    high in the stack. Gradients are the same either way (tested).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.config.use_cache = False


def sparse_tied_embedding_grads(model: Any) -> bool:
    """Make the input embedding's backward sparse when it shares its weight with the
    LM head (SmolLM2, Llama 3.2 1B/3B, Gemma, Qwen2.5 small); returns whether it did.

    A dense embedding backward writes a (V, d) tensor that is zero outside the rows of
    the batch's tokens, then autograd adds it to the head's (V, d) gradient: three
    vocabulary-sized buffers at the end of backward, the peak of a step that trains
    the embeddings. A sparse one carries only the used rows, and autograd sums it
    into the head's dense gradient, so the weight's `.grad` is dense as before (the
    optimizer, clipping and the importance hooks see the same tensor) and one
    vocabulary-sized buffer is saved (113 MB for SmolLM2-135M in fp32). Untied
    embeddings stay dense: alone, their gradient would stay sparse, which fused
    AdamW does not take.
    """
    import torch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, torch.nn.Embedding) or head is None:
        return False
    if getattr(head, "weight", None) is not emb.weight:
        return False
    emb.sparse = True
    return True


@contextlib.contextmanager
def checkpointed(model: Any) -> Iterator[bool]:
    """Activation checkpointing for the duration of a block (GRASS probing), if the
    model supports it and it is not on already; yields whether it is on.

    Probing runs backward through every block: without checkpointing its
    activation peak would be full fine-tuning's, whatever the recipe says about
    training. Gradients are the same with and without it (tested), so the MGN is too.
    """
    # transformers 5 names it is_activation_checkpointing (and warns on the old name)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    already = bool(getattr(model, name, False))
    if already or not getattr(model, "supports_gradient_checkpointing", False):
        yield already
        return
    use_cache = getattr(model.config, "use_cache", None)
    enable_gradient_checkpointing(model)
    try:
        yield True
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if use_cache is not None:
            model.config.use_cache = use_cache
