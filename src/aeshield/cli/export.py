"""``aeshield export``: a shield, its classifier and its detectors as one deployable file,
checked against the pipeline it came from before the command succeeds."""

from __future__ import annotations

import time

import click

from .options import (COUNT, Choice, check_cli_compatible, classifier_options, data_options, device_option,
                      force_option, load_cli_classifier, load_cli_data, resolve_device)


def _check_images(shield: str, dataset: str | None, data_file: str | None, n: int):
    """Up to ``n`` test images: ``--dataset`` / ``--data``, else the shield's own dataset."""
    from ..data import DATASETS
    from ..models.io import read_sidecar, resolve_weights

    if dataset is None and data_file is None:
        dataset = read_sidecar(resolve_weights(shield)).get("dataset")
        if dataset not in DATASETS:
            raise click.UsageError(f"the shield {shield} was trained on your own data ({dataset!r}); give "
                                   "--data SPEC (test images) to check the export on, or --n-check 0")
    return load_cli_data(dataset, data_file, n=n, seed=0)


@click.command("export")
@click.option("--shield", required=True, help="Shield (shipped name or path); its detectors go inside.")
@classifier_options(help="The classifier behind the shield")
@click.option("--format", "fmt", type=Choice(["onnx", "pt2"]), required=True,
              help="onnx (onnxruntime and other runtimes) or pt2 (a torch.export program).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write.")
@data_options
@click.option("--n-check", type=click.IntRange(min=0), default=200, show_default=True,
              help="Test images the exported file is checked on (0: no check).")
@click.option("--member", type=click.IntRange(min=0), default=None,
              help="MagNet with several autoencoders drawn at random: deploy autoencoder K only "
                   "(a random shield cannot be exported). Thresholds stay those of all members pooled.")
@click.option("--batch-size", type=COUNT, default=500, show_default=True, help="Batch size of the check.")
@force_option()
@device_option()
def export_cmd(shield, classifier, normalize, fmt, out, dataset, data_file, n_check, member, batch_size, force,
               device) -> None:
    """Write SHIELD + CLASSIFIER (+ detectors) as one model with outputs logits, labels (-1 where
    rejected) and reject_margin (rejected where > 0; -inf without a detector), then run the
    file (onnxruntime for .onnx, torch for .pt2) next to the pipeline on test images: the logits
    must agree within 1e-4 and the reject decisions must be equal, except where the margin is
    within 1e-4 of 0. Exits with status 2 otherwise (the file is kept for inspection)."""
    from ..defenses.base import Shielded
    from ..defenses.export import check_deterministic, check_export, export_onnx, export_pt2, fixed_member
    from ..defenses.registry import load_pipeline, load_shield

    device = resolve_device(device)
    test = _check_images(shield, dataset, data_file, n_check) if n_check else None
    model, info = load_cli_classifier(classifier, normalize, device)
    if test is not None:
        check_cli_compatible(test, [(model, info)], shield=shield, force=force)
    if member is None:  # refuse a random shield before its detectors are calibrated (seconds)
        check_deterministic(Shielded(load_shield(shield, device=device), model))
    pipeline = load_pipeline(shield, model, device=device)
    if member is not None:
        fixed_member(pipeline, member)
    shape = pipeline.in_shape  # the classifier's, else the shield card's (load_pipeline sets it)
    if not shape and test is not None:
        shape = tuple(test.images.shape[1:])
    if not shape:
        raise click.UsageError("the input shape is unknown: the classifier has no in_shape and the shield's card "
                               "none; give --dataset or --data (their images' shape is used)")
    started = time.perf_counter()
    path = (export_onnx if fmt == "onnx" else export_pt2)(pipeline, out, input_shape=shape)
    size = path.stat().st_size / 2**20
    detectors = "with its detector" if pipeline.detector is not None else "no detector: reject_margin is -inf"
    click.echo(f"wrote {path} ({fmt}, {size:.1f} MiB, {time.perf_counter() - started:.1f} s; {detectors}); "
               f"input images (N, {', '.join(map(str, shape))}), outputs logits, labels, reject_margin")
    if test is None:
        return
    check = check_export(pipeline, path, test.images, batch_size=batch_size)
    runtime = "onnxruntime" if fmt == "onnx" else "torch"
    click.echo(f"check ({runtime}) on {test.name} {test.split}: {check.summary()}")
    if not check.ok:
        raise click.ClickException(f"the exported {path} does not match the pipeline ({check.summary()}); "
                                   "the file is kept for inspection")
    click.echo("ok")
