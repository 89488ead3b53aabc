"""The workflow migrator: rewrites a ComfyUI workflow made with cubiq's ComfyUI_IPAdapter_plus
with this pack's nodes (``python -m migrate IN.json OUT.json [--ours] [--family ID]`` from the
pack's folder, or ``python -m ipadapter migrate``).

``rules.py`` rewrites the graph (:func:`migrate.rules.migrate`): by default faithfully to the
pictures cubiq's nodes make (``faithful.py``: the middle block off, a black negative image for
plus adapters, precise boosts and layer weights as one Apply), with ``--ours`` in this pack's
own meaning. ``formats.py`` reads and writes the editor's and the API's format, ``layout.py``
places the nodes of the editor's format without overlaps, ``tables.py`` holds the node
definitions it reads and writes. Plain Python: importing it loads neither torch nor ComfyUI.
"""
