"""The worker side: everything that runs inside each training process. Never imports ray or wandb."""
