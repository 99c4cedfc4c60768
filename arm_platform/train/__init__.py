"""Training: tasks, optimizer groups, lr schedule, epoch engine, checkpoints, kNN probe (plain PyTorch) and the
per-worker Ray Train loop (`loop.py`, the only Ray code here)."""
