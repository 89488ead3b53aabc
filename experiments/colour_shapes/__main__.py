"""``python -m experiments.colour_shapes [--quick] [--output_dir DIR] [--threads N] [--key value ...]``

Trains a scaled-down SD1.5 on coloured shapes (captions name the shape, never the colour),
trains an IP-Adapter on it with ``training.run``, samples through ComfyUI with this pack's
nodes at λ = 0, 0.5, 1 and measures colour transfer and shape accuracy. See README.md here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .pipeline import Settings, run
from .report import write_report

QUICK = dict(dataset_size=500, vae_steps=250, encoder_steps=150, unet_width=32, base_lr=1e-3, base_steps=300, base_batch=16, adapter_steps=600, samples_per_case=4, weights=(0.0, 1.0),
             references_per_colour=1, sampling_steps=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.colour_shapes", description=__doc__.splitlines()[2])
    parser.add_argument("--quick", action="store_true", help="the reduced settings of the CI test (a few minutes)")
    parser.add_argument("--report", default=None, help="also write the markdown table here (e.g. experiments/colour_shapes/RESULTS.md)")
    for field in dataclasses.fields(Settings):
        if field.name == "weights":
            parser.add_argument("--weights", type=float, nargs="+", default=None)
            continue
        if isinstance(field.default, bool):
            parser.add_argument(f"--{field.name}", action="store_true", default=None)
            continue
        parser.add_argument(f"--{field.name}", type=type(field.default), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logging.getLogger("colour_shapes").setLevel(logging.INFO)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update({k: v for k, v in vars(args).items() if k not in ("quick", "report") and v is not None})
    if "weights" in overrides:
        overrides["weights"] = tuple(overrides["weights"])
    result = run(Settings(**overrides))
    print(json.dumps({"table": result["table"], "chance": result["chance"], "timings_s": result["timings_s"]}, indent=2))
    if args.report:
        write_report(result, args.report)
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
