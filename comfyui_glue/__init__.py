"""What only the ComfyUI nodes (``nodes.py``) use: the nodes' interface (``interface.py``, as
data in the terms of ``node_spec.py``), reference preparation, tiles, heat maps, finding model
files by name. ComfyUI imports the pack as a package named after its folder, so these modules
import the core (``ipadapter/``) relatively. Nothing is imported here: the workflow migrator
reads the torch-free interface and must not load torch through this package.
"""
