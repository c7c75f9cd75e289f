"""Flax NNX model towers: CLIP ViT, projectors (MLP, MVP), LLaMA-family decoder, and their composition."""
