"""The PyTorch reference: tiny / full-size model builders, demo assets,
and the in-process reference pipeline (the ground truth for engines and server)."""
