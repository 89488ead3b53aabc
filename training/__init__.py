"""Trainer for IP-Adapter on Stable Diffusion 1.5: ``python -m training.run``."""
