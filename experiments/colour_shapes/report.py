"""The results as a markdown table (what README.md quotes)."""
from __future__ import annotations

from pathlib import Path


def table_markdown(result: dict) -> str:
    chance = result["chance"]
    lines = [
        "| λ | samples | colour of the reference | shape of the caption | shape of the caption, caption ≠ reference shape | shape of the reference, caption ≠ reference shape | nothing drawn |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        lines.append(
            f"| {row['weight']:g} | {row['samples']} | {row['colour_of_reference']:.0%} | {row['shape_of_caption']:.0%} | "
            f"{row['shape_of_caption_when_reference_differs']:.0%} | {row['shape_of_reference_when_caption_differs']:.0%} | "
            f"{row['nothing_drawn']:.0%} |"
        )
    lines.append(f"| chance | | {chance['colour']:.0%} | {chance['shape']:.0%} | {chance['shape']:.0%} | {chance['shape']:.0%} | |")
    return "\n".join(lines)


def loss_markdown(result: dict) -> str:
    lines = ["| t | reference = the image | reference in another colour | λ = 0 | guess: the mean latent |", "|---|---|---|---|---|"]
    for row in result.get("loss_by_timestep", []):
        lines.append(f"| {row['timestep']} | {row['match']:.4f} | {row['other_colour']:.4f} | {row['no_adapter']:.4f} | "
                     f"{row['mean_latent_guess']:.4f} |")
    return "\n".join(lines)


def encoder_text(result: dict) -> str:
    pretraining = result.get("image_encoder") or {}
    if not pretraining.get("steps"):
        return "random"
    return f"CLIP-style pretraining on full captions, {pretraining['steps']} steps of {pretraining['batch_size']}, final loss {pretraining['final_loss']:.3f}"


def write_report(result: dict, path: str | Path) -> Path:
    checks = result["classifier_checks"]
    s = result["settings"]
    text = "\n".join([
        "# colour_shapes: results",
        "",
        f"Command: `python -m experiments.colour_shapes` with settings `{s}`.",
        f"Machine: {result['machine']}. Wall time per stage (s): {result['timings_s']}.",
        "",
        table_markdown(result),
        "",
        f"Classifier accuracy on held-out dataset images (colour / shape): as drawn "
        f"{checks['drawn']['colour']:.0%} / {checks['drawn']['shape']:.0%}, after a VAE round trip "
        f"{checks['vae_round_trip']['colour']:.0%} / {checks['vae_round_trip']['shape']:.0%}.",
        f"Image encoder ({encoder_text(result)}, then frozen): nearest-centroid colour accuracy of its embedding "
        f"{result['image_encoder_colour_probe']:.0%}.",
        f"Base model: {result['base']['steps']} steps, batch {result['base']['batch_size']}, final loss {result['base']['final_loss']:.3f}, "
        f"EMA weights (decay {result['base'].get('ema_decay', 0):g}); VAE: {result['vae']['steps']} steps, "
        f"colour term weight {s.get('vae_colour_weight', 0):g}, final loss {result['vae']['final_loss']:.4f}.",
        "",
        "ε-MSE of the base model and the adapter per timestep (`diagnose.py`; held-out images, the same noise in a row):",
        "",
        loss_markdown(result),
        "",
        "![grid](grid.png)",
        "",
    ])
    path = Path(path)
    path.write_text(text)
    return path
