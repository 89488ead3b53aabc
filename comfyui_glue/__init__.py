"""What only the ComfyUI nodes (``nodes.py``) use: reference preparation, tiles, heat maps, finding
model files by name. ComfyUI imports the pack as a package named after its folder, so these
modules import the core (``ipadapter/``) relatively. Nothing is imported here: tools that read
the torch-free modules of this package (the workflow migrator) must not load torch through it.
"""
