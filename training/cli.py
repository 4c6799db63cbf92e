"""``xraybatch train``: train, tune and evaluate model bundles.

The group is registered on the main CLI with ``main.add_command(training.cli.train)``; ``python -m training.cli``
runs it on its own. Imports of torch and friends happen inside the commands, so ``--help`` answers at once.
Settings resolve as: TrainConfig defaults < ``--config FILE.toml`` < command-line flags.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger(__name__)

ARCHITECTURES = ("separable_cnn", "efficientnet_lite0", "resnet50")
CONFIGS = Path(__file__).resolve().parent / "configs"
GATE_DEFAULTS = {"components": 64, "classifier_c": 0.1, "margin": 1.0, "negatives_per_transform": 100, "generated": 100}


def _config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``binary`` and ``tune``; each left unset keeps the config file's or default value."""
    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML file of TrainConfig fields (e.g. training/configs/binary.toml)."),
        click.option("--layout", type=click.Choice(["auto", "kermany", "nih", "dicom"]), help="Data layout."),
        click.option("--architecture", type=click.Choice(ARCHITECTURES), help="Network."),
        click.option("--init", help="imagenet | none | bundle:NAME (a shipped bundle, e.g. bundle:pneumonia-binary) | PATH to a weights file."),
        click.option("--input-size", type=int, help="Model input size in pixels (square)."),
        click.option("--freeze", type=int, help="Leading feature modules kept frozen (0 = train all)."),
        click.option("--epochs", type=int, help="Maximum epochs."),
        click.option("--batch-size", type=int, help="Images per step."),
        click.option("--lr", type=float, help="AdamW learning rate."),
        click.option("--loss", type=click.Choice(["focal", "bce"]), help="Loss function."),
        click.option("--focal-gamma", type=float, help="Focal loss gamma."),
        click.option("--focal-alpha", type=float, help="Focal loss alpha for positives (omit for none)."),
        click.option("--class-weighting", type=click.Choice(["balanced", "none"]), help="Class weights."),
        click.option("--max-class-weight", type=float, help="Cap on class weights."),
        click.option("--sampling", type=click.Choice(["none", "undersample", "oversample", "repeat"]),
                     help="Class-balanced epochs (binary: under/over-sampling; multi-label: repeat factors)."),
        click.option("--repeat-threshold", type=float, help="Repeat sampling: findings rarer than this share repeat."),
        click.option("--max-repeat", type=float, help="Repeat sampling: cap on an image's repeat factor."),
        click.option("--no-finding-keep", type=float, help="Repeat sampling: share of No-Finding images per epoch."),
        click.option("--val-fraction", type=float, help="Share of patients' images held out for validation."),
        click.option("--min-recall", type=float,
                     help="Threshold rule: minimum validation recall (binary: Pneumonia; multi-label: each target)."),
        click.option("--hflip/--no-hflip", default=None, help="Random horizontal flips (off by default)."),
        click.option("--seed", type=int, help="Seed of split, order, augmentation and init."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="auto = CUDA when present."),
        click.option("--threads", type=int, help="torch CPU threads (0 = torch default)."),
        click.option("--cache-dir", help="Cache of preprocessed inputs (and checkpoints)."),
        click.option("--loader", type=click.Choice(["auto", "memory", "stream"]),
                     help="memory = cached input array; stream = decode per batch in workers; auto = by size."),
        click.option("--workers", type=int,
                     help="Processes that make the training batches (decoding when streaming, re-encoding)."),
        click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA (on by default)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _bundle_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the commands that write a bundle (``binary``, ``multilabel``), then the config options."""
    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Bundle folder to write."),
        click.option("--checkpoint-dir", help="Where last.pt/best.pt go (default CACHE_DIR/checkpoints/<bundle name>)."),
        click.option("--resume/--no-resume", default=False, help="Continue from the checkpoint's last.pt."),
        click.option("--name", help="Model name recorded in the bundle."),
        click.option("--version", "model_version", help="Model version recorded in the bundle."),
    ]
    fn = click.pass_context(_config_options(fn))
    for option in reversed(options):
        fn = option(fn)
    return fn


def resolve_config(data: Path, config_file: Path | None, flags: Mapping[str, Any], base_file: Path | None = None
                   ) -> Any:
    """TrainConfig from defaults < ``base_file`` (a command's recipe) < TOML file < flags (``None`` = unset)."""
    from training.train import TrainConfig

    values: dict[str, Any] = {}
    augment: dict[str, Any] = {}
    reencode: dict[str, Any] = {}
    for path in (base_file, config_file):
        if path is None:
            continue
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise click.ClickException(f"{path} is not valid TOML: {err}") from err
        augment.update(table.pop("augment", {}))
        reencode.update(table.pop("reencode", {}))
        values.update(table)
    if flags.get("hflip") is not None:
        augment["hflip"] = flags["hflip"]
    values.update({k: v for k, v in flags.items() if v is not None and k != "hflip"})
    values["data"] = str(data)
    if augment:
        values["augment"] = augment
    if reencode:
        values["reencode"] = reencode
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise click.ClickException(f"invalid training settings: {err}") from err


def _command_line(ctx: click.Context) -> list[str]:
    """``xraybatch train <command>`` with the options given on the command line (as parsed), in order."""
    from click.core import ParameterSource

    words = ["xraybatch", "train", ctx.info_name or ""]
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and param.is_flag:
            words.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        elif isinstance(param, click.Option) and param.multiple:
            for each in value:
                words += [param.opts[0], str(each)]
        elif isinstance(param, click.Option):
            words += [param.opts[0], str(value)]
        else:
            words.append(str(value))
    return words


class _RichReporter:
    """A rich progress bar per epoch with the running loss and accuracy, and a line per finished epoch."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[live]}"), console=self.console)
        self.task: Any = None

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", live="")

    def step(self, metrics: Mapping[str, float]) -> None:
        live = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.progress.update(self.task, advance=1, live=live)

    def epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.progress.stop()
        self.progress.remove_task(self.task)
        self.console.print(f"epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), highlight=False)


def _reporter() -> Any:
    from rich.console import Console

    if Console(stderr=True).is_terminal:
        return _RichReporter()
    from training.train import LogReporter

    return LogReporter(every=20)


@click.group("train")
def train() -> None:
    """Train, tune and evaluate model bundles from public or local data.

    \b
    Example:
        xraybatch train binary --data ../shared/data/kermany --out bundles/pneumonia
        xraybatch train evaluate bundles/pneumonia --data ../shared/data/kermany --split test
    """


@train.command("binary")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data root: Kermany (train/NORMAL|PNEUMONIA), NIH, or a DICOM folder with labels.csv.")
@_bundle_options
def binary(ctx: click.Context, data: Path, out: Path, config_file: Path | None, resume: bool, model_version: str | None,
           **flags: Any) -> None:
    """Train the binary Normal/Pneumonia model and write a bundle.

    Settings start from training/configs/binary.toml (--config and flags override it), the recipe of the shipped
    xraybatch/bundles/pneumonia-binary: EfficientNet-Lite0 from ImageNet with the stem and first stage frozen,
    224 px, a patient-wise 15% validation split, weighted focal loss with balanced class weights, the JPEG
    quality of the training pictures read off them, and the threshold rule "best Youden J among thresholds
    that keep the validation Pneumonia recall", with the optimisation settings of the Optuna study
    (docs/training.md). The bundle holds model.json, weights.safetensors, the split manifest, a model card and
    ROC/calibration/confusion plots.

    \b
    Example:
        xraybatch train binary --data ../shared/data/kermany --out my-bundle
        xraybatch train binary --data ../shared/data/kermany --out my-bundle --resume
        xraybatch train binary --data /pacs/export --layout dicom --out site-bundle --epochs 5
    """
    _run(ctx, data, out, config_file, resume, model_version, flags, base_file=CONFIGS / "binary.toml")


@train.command("multilabel")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="NIH ChestX-ray14 root (metadata/Data_Entry_2017*.csv, train_val_list.txt, PNGs anywhere below).")
@_bundle_options
def multilabel(ctx: click.Context, data: Path, out: Path, config_file: Path | None, resume: bool,
               model_version: str | None, **flags: Any) -> None:
    """Train the multi-label model (14 NIH ChestX-ray14 findings + No Finding) and write a bundle.

    Settings start from training/configs/multilabel.toml (--config and flags override it), the recipe of the shipped
    xraybatch/bundles/nih-multilabel: EfficientNet-Lite0 from ImageNet, the official train_val list split
    patient-wise, weighted focal loss with capped class weights, repeat-factor sampling of rare findings with
    No-Finding images under-sampled, one shared temperature and per-finding thresholds chosen on validation.
    Uses whatever NIH images are present (images/, images_64/, or a full download's images_0XX/); above
    stream_above images they are decoded per batch in DataLoader workers instead of cached in memory.

    \b
    Example:
        xraybatch train multilabel --data ../shared/data/nih_cxr14 --out my-nih-bundle
        xraybatch train multilabel --data /data/nih --out nih-full --device cuda --workers 8 --resume
    """
    flags["task"] = "multilabel"
    _run(ctx, data, out, config_file, resume, model_version, flags, base_file=CONFIGS / "multilabel.toml")


def _run(ctx: click.Context, data: Path, out: Path, config_file: Path | None, resume: bool,
         model_version: str | None, flags: dict[str, Any], base_file: Path | None = None) -> None:
    """Resolve the settings, train, write the bundle and print its validation summary."""
    from training.train import train as run

    flags["version"] = model_version
    cfg = resolve_config(data, config_file, flags, base_file)
    try:
        bundle = run(cfg, out, reporter=_reporter(), resume=resume, command=_command_line(ctx))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    _echo_summary(bundle)


def _echo_summary(bundle: Path) -> None:
    import json

    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    m = meta["metrics"]["validation"]
    if meta["task"] == "multilabel":
        click.echo(f"bundle {bundle}: validation mean AUROC {m['mean_auroc']:.4f} over {m['findings_with_auroc']} "
                   f"findings (n={m['n']}, temperature {meta['temperature'][0]})")
        _echo_per_target(m)
        return
    click.echo(f"bundle {bundle}: validation accuracy {m['accuracy']:.4f}, AUROC {m['auroc']:.4f}, "
               f"threshold {m['threshold']:.4f}")
    _echo_per_class(m)


def _echo_per_target(metrics: Mapping[str, Any]) -> None:
    for name, c in metrics["per_target"].items():
        click.echo(f"  {name:<18} AUROC {c['auroc']:.4f} threshold {c['threshold']:.4f} precision "
                   f"{c['precision']:.4f} recall {c['recall']:.4f} f1 {c['f1']:.4f} support {c['support_pos']}")


def _echo_per_class(metrics: Mapping[str, Any]) -> None:
    for name, c in metrics["per_class"].items():
        click.echo(f"  {name:<10} precision {c['precision']:.4f} recall {c['recall']:.4f} f1 {c['f1']:.4f} "
                   f"support {c['support']}")


@train.command("tune")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data root, as for `train binary`.")
@click.option("--storage", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite file of the Optuna study; rerun with the same file to resume.")
@click.option("--study-name", default="pneumonia-binary", show_default=True, help="Study name in the storage.")
@click.option("--trials", default=20, show_default=True, type=int, help="Trials to run in this invocation.")
@click.option("--timeout", type=float, help="Stop starting trials after this many seconds.")
@click.option("--subset", type=float, default=1.0, show_default=True,
              help="Fraction of the patients used per trial (whole patients), to make trials cheap.")
@_config_options
def tune(data: Path, storage: Path, study_name: str, trials: int, timeout: float | None, subset: float,
         config_file: Path | None, **flags: Any) -> None:
    """Search learning rate, batch size, focal alpha/gamma, max class weight, sampling and the threshold rule.

    Each trial trains on the training side of the patient-wise split and is scored on its validation side
    (AUROC, then balanced accuracy at the trial's threshold). The study lives in a SQLite file, so an
    interrupted search continues where it stopped. The best parameters are printed as TOML for --config.

    \b
    Example:
        xraybatch train tune --data ../shared/data/kermany --storage tune.sqlite --trials 20 --epochs 3
        xraybatch train tune --config training/configs/multilabel.toml --data ../shared/data/nih_cxr14 \\
            --storage nih-tune.sqlite --study-name nih14 --trials 10 --epochs 3
    """
    from training.tune import best_config, run_study, toml_changes

    cfg = resolve_config(data, config_file, flags)
    try:
        study = run_study(cfg, storage, study_name, trials, timeout=timeout, subset=subset)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    best = study.best_trial
    objective = "mean F1 over findings" if cfg.task == "multilabel" else "balanced accuracy"
    click.echo(f"best trial #{best.number} of {len(study.trials)}: {objective} {best.value:.4f}, "
               f"AUROC {best.user_attrs.get('auroc', float('nan')):.4f}")
    click.echo("# best settings, as TOML for --config (only what differs from the base settings)")
    for line in toml_changes(best_config(study, cfg), cfg):
        click.echo(line)


@train.command("gate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A training-data root (Kermany, NIH, DICOM layout); repeat for each. Its split manifest's train "
                   "side is fitted on, its val side sets the threshold.")
@click.option("--manifest", "manifests", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Split manifest of each --data, in order (default: that of BUNDLE or of the shipped bundle "
                   "trained on the same layout).")
@click.option("--val-images", "val_images", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="More chest radiographs (files or folders: JPEG, PNG, DICOM) that must pass.")
@click.option("--turn", "turn", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Chest radiographs that must pass, and must be refused turned 90 degrees and upside down.")
@click.option("--reject", "reject", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Images (files or folders) that must be refused, e.g. a CR extremity, a lateral, a pet's thorax.")
@click.option("--components", type=int, default=GATE_DEFAULTS["components"], show_default=True,
              help="PCA components of the distance score.")
@click.option("--classifier-c", type=float, default=GATE_DEFAULTS["classifier_c"], show_default=True,
              help="Inverse L2 strength (scikit-learn C) of the logistic classifier.")
@click.option("--margin", type=float, default=GATE_DEFAULTS["margin"], show_default=True,
              help="Threshold = max over validation chests + MARGIN x (that max - their median).")
@click.option("--negatives", type=int, default=GATE_DEFAULTS["negatives_per_transform"], show_default=True,
              help="Training chests per negative transform and data root.")
@click.option("--generated", type=int, default=GATE_DEFAULTS["generated"], show_default=True,
              help="Noise and gradient pictures among the negatives (textures and shapes: twice as many).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--cache-dir", default="data-cache", show_default=True, help="Cache of the computed features.")
@click.pass_context
def gate(ctx: click.Context, bundle: Path, data: tuple[Path, ...], manifests: tuple[Path, ...],
         val_images: tuple[Path, ...], turn: tuple[Path, ...], reject: tuple[Path, ...], components: int,
         classifier_c: float, margin: float, negatives: int, generated: int, threads: int, cache_dir: str) -> None:
    """Fit BUNDLE's input gate on its own backbone features and write it into the bundle.

    The pooled backbone features (whole map and halves) of the training chest radiographs of every --data root
    give a distance (Mahalanobis) and, against negatives made from them (turned, upside down, cropped) and
    pictures that are no radiograph (noise, gradients, textures, the non-chest images of pydicom-data), a
    logistic classifier. The thresholds keep every validation chest radiograph in, with a margin; the command
    fails, writing nothing, if a --reject image, a --turn chest turned or upside down, noise or a gradient would
    pass. Writes gate.safetensors and the "gate" block of model.json (scores, thresholds, rule, score
    distributions, false-reject rate), and the model card's "Input gate" section. Features are cached in
    --cache-dir. See docs/training.md, "The input gate".

    \b
    Example:
        xraybatch train gate xraybatch/bundles/nih-multilabel \\
            --data ../shared/data/kermany --data ../shared/data/nih_cxr14 \\
            --val-images ../shared/data/kermany/val --val-images ../shared/data/dicom/torchxrayvision_tests \\
            --turn ../shared/data/dicom/pydicom_data_wg04/RG1_UNCI.dcm \\
            --reject ../shared/data/dicom/pydicom_data_wg04/RG3_UNCI.dcm \\
            --reject ../shared/data/dicom/highdicom_test_files/dx_image.dcm
    """
    from training.gate import GateFitConfig, fit_gate
    from xraybatch.errors import ModelError
    from xraybatch.infer import set_threads

    set_threads(threads)
    if len(manifests) > len(data):
        raise click.ClickException(f"{len(manifests)} --manifest for {len(data)} --data; give at most one per --data")
    cfg = GateFitConfig(components=components, classifier_c=classifier_c, margin=margin,
                        negatives_per_transform=negatives, generated=generated)
    try:
        block = fit_gate(bundle, data, manifests, val_images, reject, turn, cfg,
                         cache_dir=Path(cache_dir) if cache_dir else None, command=_command_line(ctx))
    except (ValueError, FileNotFoundError, ModelError) as err:
        raise click.ClickException(str(err)) from err
    report = block["report"]
    click.echo(f"bundle {bundle}: input gate written ({block['file']}); false-reject rate on validation "
               f"{block['false_reject_rate_validation']:.4f} ({report['val_chests']['refused']} of "
               f"{report['val_chests'][block['scores'][0]['name']]['n']} chests)")
    for s in block["scores"]:
        click.echo(f"  {s['name']:<10} threshold {s['threshold']:.4f}")
    for name, row in report["groups"].items():
        cells = "  ".join(f"{s['name']} {row[s['name']]['min']:.2f}/{row[s['name']]['median']:.2f}/"
                          f"{row[s['name']]['max']:.2f}" for s in block["scores"])
        click.echo(f"  {name:<28} n={row[block['scores'][0]['name']]['n']:<5} {cells}  refused "
                   f"{row['rate_refused']:.2%}")
    for case, v in report["test_cases"].items():
        click.echo(f"  must reject {case}: " + ", ".join(f"{s['name']} {v[s['name']]:.2f}" for s in block["scores"]))


@train.command("evaluate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data root to score (Kermany, NIH or DICOM layout).")
@click.option("--layout", type=click.Choice(["auto", "kermany", "nih", "dicom"]), default="auto", show_default=True)
@click.option("--split", default="test", show_default=True,
              help="Split of the layout: test/val/train (Kermany); 'manifest-val' = the bundle's validation side.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a Markdown report (and its ROC/calibration PNGs beside it).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--cache-dir", default="data-cache", show_default=True, help="Cache of preprocessed inputs.")
def evaluate(bundle: Path, data: Path, layout: str, split: str, report: Path | None, threads: int,
             cache_dir: str) -> None:
    """Score a bundle on labelled data through the production Predictor, at the bundle's own threshold.

    Prints accuracy, AUROC and per-class precision/recall/F1 with support; --report also writes plots.

    \b
    Example:
        xraybatch train evaluate xraybatch/bundles/pneumonia-binary --data ../shared/data/kermany --split val
        xraybatch train evaluate my-bundle --data ../shared/data/kermany --split manifest-val --report eval.md
        xraybatch train evaluate xraybatch/bundles/nih-multilabel --data /data/nih --split test
    """
    from training.evaluate import evaluate_bundle
    from xraybatch.errors import ModelError

    try:
        metrics = evaluate_bundle(bundle, data, layout=layout, split=split, report=report, threads=threads,
                                  cache_dir=Path(cache_dir) if cache_dir else None)
    except (ValueError, FileNotFoundError, ModelError) as err:
        raise click.ClickException(str(err)) from err
    if "per_target" in metrics:
        click.echo(f"{bundle} on {data} ({split}, n={metrics['n']}): mean AUROC {metrics['mean_auroc']:.4f} over "
                   f"{metrics['findings_with_auroc']} findings")
        _echo_per_target(metrics)
        return
    click.echo(f"{bundle} on {data} ({split}, n={metrics['n']}): accuracy {metrics['accuracy']:.4f}, "
               f"AUROC {metrics['auroc']:.4f}, threshold {metrics['threshold']:.4f}")
    _echo_per_class(metrics)
    click.echo(f"  confusion (rows true, cols predicted): {metrics['confusion_matrix']['rows_true_cols_pred']}")


@train.command("consistency")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Data root the bundles were trained on (their split manifests name files relative to it).")
@click.option("--n", "n", default=200, show_default=True, type=click.IntRange(min=1),
              help="Validation pictures per bundle: a seeded sample of the manifest's val rows (all when fewer).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sample.")
@click.option("--threads", default=2, show_default=True, type=int, help="torch CPU threads of the pipeline.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the reports (one per bundle) to this JSON file.")
@click.option("--write-card/--no-write-card", default=False, show_default=True,
              help="Store the report in each bundle's model.json (metrics.encoding_spread) and refresh its card.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the DICOM files and the results DB in this folder (default: a temporary folder).")
def consistency(bundles: tuple[Path, ...], data: Path, n: int, seed: int, threads: int, json_out: Path | None,
                write_card: bool, keep: Path | None) -> None:
    """Measure how much a bundle's probabilities change with the encoding of the same image.

    Validation pictures of each bundle (the val rows of its split_manifest.csv) are written as DICOM in six
    encodings (8/10/12/15/16-bit, MONOCHROME1 and 2, with and without a window or VOI LUT, rescale, JPEG 2000 and
    JPEG-LS lossless, JPEG baseline lossy), run through run-folder, and read back from the results DB. Prints
    per target the max and median spread (max - min probability over the encodings of one picture), over the
    lossless encodings and over all; the target is a max lossless spread <= 0.02.

    \b
    Example:
        xraybatch train consistency xraybatch/bundles/pneumonia-binary --data ../shared/data/kermany --n 20
        xraybatch train consistency my-nih-bundle --data ../shared/data/nih_cxr14 --json spread.json --write-card
    """
    import json

    from training.consistency import measure_bundle, spread_summary, spread_table
    from training.consistency import write_card as store
    from xraybatch.errors import XrayBatchError

    reports = []
    for k, bundle in enumerate(bundles):
        folder = None if keep is None else keep / f"{k:02d}-{bundle.name}"
        try:
            report = measure_bundle(bundle, data, n, seed, threads, keep=folder)
        except (ValueError, FileNotFoundError, XrayBatchError) as err:
            raise click.ClickException(str(err)) from err
        reports.append(report)
        click.echo(spread_summary(report))
        click.echo(spread_table(report))
        for row in report["not_done"][:5]:
            click.echo(f"  not done: {row['file']} as {row['encoding']}: {row['state']} ({row['reason']})")
        if write_card:
            try:
                card = store(bundle, report)
            except XrayBatchError as err:
                raise click.ClickException(str(err)) from err
            click.echo(f"wrote metrics.encoding_spread into {bundle / 'model.json'} and refreshed {card}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        partial = json_out.with_name(json_out.name + ".part")
        partial.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")
        partial.replace(json_out)
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train()
