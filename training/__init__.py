"""Trainer for IP-Adapters on the model families of ``ipadapter.registry`` (SD1.5, SDXL): ``python -m training.run``."""
