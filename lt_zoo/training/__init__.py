"""The trainer as a package (CLI: train/train.py).  Data flows one way through its modules:

config (typed sections) -> data (build_data, build_loaders) -> model (network + loss) ->
stages (stage1, crt, lws, tau_norm, fsa: what trains) -> loop (epochs, metrics, checkpoint) ->
trainer (run: top to bottom, then eval.json and the timm export).

Submodules are imported explicitly (``from lt_zoo.training import trainer``): importing
``lt_zoo.training.config`` alone stays free of torch.
"""
