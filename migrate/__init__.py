"""The workflow migrator: rewrites a ComfyUI workflow made with cubiq's ComfyUI_IPAdapter_plus
with this pack's nodes (``python -m migrate IN.json OUT.json`` from the pack's folder).

``rules.py`` rewrites the graph (:func:`migrate.rules.migrate`), ``formats.py`` reads and
writes the editor's and the API's format, ``tables.py`` holds the node definitions it reads
and writes. Plain Python: importing it loads neither torch nor ComfyUI.
"""
