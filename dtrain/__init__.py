"""dtrain: distributed training of classic neural architectures on Ray Train with PyTorch DDP or DeepSpeed."""

__version__ = "0.1.0"
