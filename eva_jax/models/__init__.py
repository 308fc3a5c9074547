"""Flax NNX models: the Wan DiT (models/wan), VAE, CLIP, umT5, IDM and LoRA."""
