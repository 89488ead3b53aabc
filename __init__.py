"""ComfyUI entry point.

ComfyUI imports this folder as a package named after the folder, whatever it
is; everything below is imported relatively, so nothing here claims a global
module name that another node pack could also use.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
