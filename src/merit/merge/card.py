"""The merged model's README.md, and the weights in words (also printed by ``merit merge``)."""

from __future__ import annotations

import math

from merit.merge.manifest import MANIFEST_FILE, MergeManifest, json_text


def describe_weights(manifest: MergeManifest) -> str:
    """How the weights were chosen, in words (said explicitly in the CLI output and card)."""
    total = math.fsum(manifest.weights_given)
    if manifest.normalized:
        how = f"normalised: divided by their sum {total:g}"
    else:
        how = f"used as given (not normalised; they sum to {total:g})"
    return f"{manifest.weights_from}, {how}"


def model_card(manifest: MergeManifest) -> str:
    """The output's README.md: what was merged, how, and how to check it."""
    m = manifest
    scale = f" with s = {m.scale:g}" if m.scale is not None else ""
    dtype = m.dtype or "as the base (" + ", ".join(m.output_dtypes) + ")"
    role = (
        "(θ0, the model the checkpoints were trained from)"
        if m.base_is_theta0
        else "(supplies structure and files only)"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- merit",
        "---",
        "",
        "# Merged model",
        "",
        f"Made by `merit merge` ({m.created_by}): a **{m.method.replace('_', '-')}** merge "
        f"of {len(m.checkpoints)} checkpoints, {m.formula}{scale}.",
        "",
        f"- Weights: {describe_weights(m)}.",
        f"- Arithmetic: accumulated in {m.accumulation}; output dtype {dtype}.",
        f"- Base: `{m.base}` {role}: tensor names, shapes and dtypes (a tied `lm_head` stays "
        "tied), config, generation config, tokenizer, chat template and processor files come "
        "from it.",
        f"- θ0 fingerprint: `{m.base_fingerprint or 'unknown'}`.",
        f"- {m.num_tensors} tensors, {m.total_bytes:,} bytes of weights.",
        "",
        *_weights_table(m),
        *_metadata_block(m),
        *_proof(m),
    ]
    return "\n".join(lines)


def _weights_table(m: MergeManifest) -> list[str]:
    lines = ["| k | checkpoint | weight | coefficient |", "|---|---|---|---|"]
    for k, (ckpt, w, c) in enumerate(zip(m.checkpoints, m.weights, m.coefficients)):
        lines.append(f"| {k} | `{ckpt}` | {w:.6g} | {c:.6g} |")
    if m.base_coefficient:
        lines.append(f"| θ0 | `{m.base}` | | {m.base_coefficient:.6g} |")
    return lines


def _metadata_block(m: MergeManifest) -> list[str]:
    if not m.metadata:
        return []
    return ["", "Recorded with the merge:", "", "```json", json_text(m.metadata).strip(), "```"]


def _proof(m: MergeManifest) -> list[str]:
    return [
        "",
        "## Proof",
        "",
        f"`{MANIFEST_FILE}` lists the sha256 of every input and output file. Check them with",
        "",
        "```bash",
        "merit verify-merge THIS_DIRECTORY",
        "```",
        "",
        "| input file | sha256 |",
        "|---|---|",
        *(f"| `{f}` | `{h}` |" for f, h in m.inputs.items()),
        "",
    ]
