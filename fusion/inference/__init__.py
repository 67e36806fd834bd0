"""Inference: fusing images of any size and colour with any family, tiled or whole."""
