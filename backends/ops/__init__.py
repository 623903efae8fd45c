"""torch.library custom ops (namespace `surgery`), each with its plain-PyTorch reference."""
