"""Shared by the Ray tests: the tiny recipe shrunk to a 2-block, 32-wide model that trains in seconds, and a stand-in
for `launch.build_trainer` that proves a finished run is returned from storage, not trained again."""

TINY = ["model.embed_dim=32", "model.depth=2", "model.decoder_dim=32", "model.decoder_head_dim=16"]


def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")
