"""Overrides shared by the Ray tests: the tiny recipe shrunk to a 2-block, 32-wide model that trains in seconds."""

TINY = ["model.embed_dim=32", "model.depth=2", "model.decoder_dim=32", "model.decoder_head_dim=16"]
