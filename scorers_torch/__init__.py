"""PyTorch side of bdpo_jax: scorers, VAE and text encoding, votes -> ArrayRecord shards."""
