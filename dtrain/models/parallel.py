"""How a catalog model is split for sharded data parallelism (FSDP2): its blocks, each sharded (and compiled, and
checkpointed) as one unit, and the function that applies ``fully_shard`` to them, as torchtitan keeps a
``parallelize_*`` beside each of its models. Only torch is used here; the engine decides when it runs."""

from __future__ import annotations

from typing import Any

from torch import nn

BLOCK_TYPES = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.RNNBase, nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d,
               nn.BatchNorm3d)
"""The layers a model is cut into by default: each gathers its weights just before its own forward."""


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost Linear, convolution, recurrent, embedding and normalisation layers below the root, in order."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, BLOCK_TYPES):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def parallelize(model: nn.Module, blocks: list[nn.Module], **fsdp: Any) -> None:
    """fully_shard(block, **fsdp) for each block, then the root, which holds every parameter left over.

    A block's weights are gathered just before its forward and freed after it (reshard_after_forward), so the
    model may touch a block's weights only inside that block's forward; a model that reads them elsewhere (an RBM's
    Gibbs chain uses W and its transpose) lists no blocks and is gathered whole around the root's forward.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **fsdp)
    fully_shard(model, **fsdp)
