"""User models that break dtrain's contract, named by import path in test_bad_input.py's cases."""

from __future__ import annotations

from torch import Tensor, nn

from dtrain.data import Arrays
from dtrain.models import CatalogModel


class Bare(CatalogModel):
    """Its forward returns the logits, a bare tensor, where the contract asks for StepOutput(loss, metrics)."""

    def __init__(self, cfg: object, meta: object) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, batch: tuple[Tensor, ...]) -> Tensor:
        return self.linear(batch[0].flatten(1))


class NotADataclassConfig(Bare):
    """Its Config is a plain class, so its options cannot be validated."""

    class Config:
        width = 3


class Exploding(Bare):
    """Its constructor raises."""

    def __init__(self, cfg: object, meta: object) -> None:
        raise ValueError("no GPU-free version of this layer")


NOT_CALLABLE = 42


def dict_loader(n: int = 10) -> dict:
    """A data loader returning a dict where dtrain.data.Arrays is expected."""
    return {"x": list(range(n))}


def failing_loader() -> Arrays:
    """A data loader whose own code fails."""
    raise FileNotFoundError("/data/shards/0.bin")
