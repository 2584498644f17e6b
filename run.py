"""Command line: parse, check every flag before any work, dispatch.

    python run.py --labeled-fraction 0.1            train M2 on MNIST with 10% of the labels
    python run.py --num-labeled 100 --epochs 5      the paper's settings: 100, 600, 1000, 3000
    python run.py --dataset fashion-mnist --num-labeled 1000      clothes instead of digits
    python run.py --dataset npz --data-file mine.npz              your own images (datasets.py)
    python run.py --resume runs/NAME                continue a stopped run exactly

    python run.py evaluate RUN [--a-samples S]      accuracy, confusion matrix, ELBO, reconstructions
    python run.py sample RUN [--digit 7] [--n 64]   one digit in many styles, or all digits per style
    python run.py analogies RUN                     styles of test images drawn as every digit
    python run.py latent RUN [--digit 3]            the latent space (and, for --z-dim 2, the manifold)
    python run.py animate RUN                       a GIF of the per-epoch sample grids

    python run.py compare m2:enum m2:trace baseline --num-labeled 3000 --seeds 3
                                                    inference schemes side by side (compare.py)

Environment: SSVAE_THREADS, CPU threads for torch (default: one per core); SSVAE_DATA, the
folder holding MNIST/raw/ (and FashionMNIST/raw/) when --data-dir is not given (default ./data).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

import compare
import datasets
import explore
import hardware
from checkpoint import FIX, MISFIT, RUN_STATE, CheckpointError, WriteError, atomic_write_text, first_line
from data import DataError, num_labeled_from_fraction, split
from guides import GUIDES
from inference import ELBOS
from train import DEVICES, PEAK_LR, PRECISIONS, Config, NonFiniteError, Stopped, Trainer, read_checkpoint


class UsageError(Exception):
    """A flag that cannot work; the message names it and the fix."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        raise UsageError(message)


def positive(kind: type) -> type:
    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value
    check.__name__ = f"positive {kind.__name__}"
    return check


def fraction(text: str) -> float:
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a float") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def add_shared_flags(p: Parser) -> None:
    """The flags of a training run that a comparison shares: data, length, network sizes."""
    d = Config()
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labeled-fraction", type=fraction, help="fraction of the 50000 training images labelled, in (0, 1]")
    labels.add_argument("--num-labeled", type=positive(int), help=f"labelled images, a multiple of 10 (default {d.num_labeled})")
    p.add_argument("--num-train", type=positive(int), help="train on the first N training images, for quick runs (default: all, 50000 for MNIST)")
    p.add_argument("--unlabeled-valid", action="store_true", default=None, help="the validation images also train, "
                   "unlabelled, as in Maaløe et al.'s code; their labels still only choose the best epoch (default: off)")
    p.add_argument("--epochs", type=positive(int), help=f"passes over the unlabelled images (default {d.epochs})")
    p.add_argument("--batch-size", type=positive(int), help=f"images per step, labelled and unlabelled together (default {d.batch_size})")
    p.add_argument("--labeled-batch", type=positive(int), help="labelled images in each step's --batch-size, at most all of them "
                   "(default: in proportion to their share, at least 1; with fewer than N/46 labels, 100 or all; README, \"Choices\")")
    p.add_argument("--lr", type=positive(float), help="Adam's peak learning rate, cosine-annealed to 0 over the epochs "
                   f"(default by the guide's model: {', '.join(f'{m} {lr:g}' for m, lr in PEAK_LR.items())}; README, \"Choices\")")
    p.add_argument("--z-dim", type=positive(int), help=f"size of the style z (default {d.z_dim})")
    p.add_argument("--hidden-dim", type=positive(int), help=f"hidden units of every network (default {d.hidden_dim})")
    p.add_argument("--hidden-layers", type=positive(int), help="hidden layers of every network: 2 as in Maaløe et al.'s, "
                   f"1 as in the M2 paper (default {d.hidden_layers}; README, \"Choices\")")
    p.add_argument("--a-samples", type=positive(int), help="draws of a over which the sdgm and adgm guides average "
                   f"q(y | a, x) to classify (default {d.a_samples})")
    p.add_argument("--precision", choices=PRECISIONS, help="matrix products in bf16 (autocast; densities stay fp32) or fp32; "
                   f"auto: bf16 where the device multiplies bf16 natively and measurably faster (default {d.precision})")
    p.add_argument("--device", choices=DEVICES, help=f"where to train; auto: CUDA when present (default {d.device})")
    p.add_argument("--dataset", choices=datasets.DATASETS, help=f"the images: MNIST digits, Fashion-MNIST clothes, or "
                   f"your own .npz (--data-file; datasets.py says what it holds) (default {d.dataset})")
    p.add_argument("--data-file", help="the .npz file of --dataset npz: x (images), y (labels, -1 where unknown), "
                   "optionally x_test, y_test, classes")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/ or FashionMNIST/raw/ (default: $SSVAE_DATA, else ./data)")


def parser() -> Parser:
    p = Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    add_shared_flags(p)
    p.add_argument("--seed", type=int, help=f"chooses the labelled images and all randomness (default {d.seed})")
    p.add_argument("--guide", choices=sorted(GUIDES), help=f"the guide q(y, z | x), and with it the model it is paired with: m2 for most, sdgm and adgm for those (default {d.guide})")
    p.add_argument("--elbo", choices=sorted(ELBOS), help="enum: sum y out exactly; trace: sample y, score function; graph: "
                   "score function, Rao-Blackwellised, with a baseline; iwae: importance-weighted bound over "
                   "--num-particles draws of z; none: no ELBO, labels only (default: the guide's first)")
    p.add_argument("--num-particles", type=positive(int), help=f"samples per ELBO estimate, vectorised (default {d.num_particles})")
    p.add_argument("--alpha", type=float, help="weight of the classification loss, alpha in J + alpha * E_labelled[-log q(y|x)] (default N * max(4.6, 0.1 N / N_l) for N training images, N_l labelled: 46 per labelled image at 10%% labels, 25000 at 100; Kingma's 0.1 * N is 5000)")
    p.add_argument("--beta1", type=float, help=f"Adam's beta1, in [0, 1) (default {d.beta1})")
    p.add_argument("--clip-norm", type=positive(float), help="rescale each step's gradient so that the gradient of the "
                   "per-image loss has at most this norm (default: no clipping)")
    p.add_argument("--clip-value", type=positive(float), metavar="V", help="clip each component of the per-image loss's "
                   "gradient to [-V, V], after --clip-norm; Maaløe et al. use --clip-norm 5 --clip-value 1 "
                   "(default: no clipping)")
    p.add_argument("--weight-prior", type=positive(float), metavar="SIGMA", help="a N(0, SIGMA^2) prior on every "
                   "weight matrix, so that training is a MAP estimate of the weights; Maaløe et al. use 1 "
                   "(default: none)")
    p.add_argument("--init-std", type=positive(float), metavar="STD", help="Maaløe et al.'s initialisation: every bias "
                   "and the weights of each Normal's output layer drawn from N(0, STD^2), so that every q(a | x), "
                   "q(z | ...) and p(a | ...) starts near N(0, I), the other weights from Glorot's normal; they use "
                   "1e-3 (default: torch's initialisation)")
    p.add_argument("--classifier-layers", type=positive(int), metavar="N", help="hidden layers of the classifier q(y | x) "
                   "(q(y | a, x) for sdgm and adgm) alone (default: --hidden-layers)")
    p.add_argument("--classifier-dropout", type=rate, metavar="P", help="dropout at rate P after each hidden layer "
                   f"of the classifier q(y | x) (q(y | a, x) for sdgm and adgm) in training (default {d.classifier_dropout:g}: none)")
    p.add_argument("--labeled-elbo-weight", type=positive(float), help="weight of each labelled image's ELBO L(x, y) "
                   "against an unlabelled image's U(x); N / N_l weighs the two means equally, as Maaløe et al.'s code "
                   f"does (default {d.labeled_elbo_weight:g}: Kingma's Eq. 9)")
    p.add_argument("--skip-nonfinite", action="store_true", default=None, help="skip (and count) steps whose loss or gradient is not finite, instead of stopping")
    p.add_argument("--out", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing --out folder")
    p.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the run in folder RUN; only --epochs (and where the data is, --data-dir) may change")
    return p


def labels_and_data(args: argparse.Namespace, given: dict) -> None:
    """Resolve --labeled-fraction into num_labeled and check the data flags, in place in `given`."""
    if args.dataset == "npz":
        if not args.data_file:
            raise UsageError("--dataset npz needs --data-file FILE.npz (x: images, y: labels, -1 where unknown)")
        if args.labeled_fraction is not None or args.num_labeled is not None:
            raise UsageError("--dataset npz uses the labels its file has: drop --num-labeled / --labeled-fraction "
                             "(mark unknown labels -1 in y)")
        given["num_labeled"] = None
    elif args.data_file:
        raise UsageError("--data-file is for --dataset npz; drop it, or add --dataset npz")
    if args.labeled_fraction is not None:
        given["num_labeled"] = num_labeled_from_fraction(args.labeled_fraction, given.get("num_train") or 50000)


def config_from_args(args: argparse.Namespace) -> Config:
    given = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in fields(Config)}}
    labels_and_data(args, given)
    if "elbo" not in given:
        given["elbo"] = GUIDES[given.get("guide", Config.guide)].elbos[0]
    config = Config(**given)
    if config.alpha is not None and not (config.alpha >= 0 and math.isfinite(config.alpha)):
        raise UsageError(f"--alpha {config.alpha} must be a finite number >= 0")
    if config.labeled_batch is not None and config.labeled_batch >= config.batch_size:
        raise UsageError(f"--labeled-batch {config.labeled_batch} must be below --batch-size {config.batch_size}, "
                         f"which also holds the unlabelled images")
    if not 0 <= config.beta1 < 1:
        raise UsageError(f"--beta1 {config.beta1} must be in [0, 1)")
    if config.elbo not in GUIDES[config.guide].elbos:
        raise UsageError(f"--guide {config.guide} works with --elbo {' or '.join(GUIDES[config.guide].elbos)}, not {config.elbo}")
    return config


def resume_config(args: argparse.Namespace) -> tuple[Config, Path, dict]:
    """The config, folder and saved state of the run to continue."""
    run = args.resume
    moved = ("data_dir", "data_file")
    changed = [k for k, v in vars(args).items() if v not in (None, False) and k not in ("resume", "epochs", *moved)]
    if changed:
        raise UsageError(f"--resume keeps the run's own settings; drop --{changed[0].replace('_', '-')} "
                         f"(only --epochs, --data-dir and --data-file may change)")
    if not (run / "checkpoint.pt").is_file():
        raise UsageError(f"--resume {run}: no checkpoint.pt there; give the folder of a run started by run.py")
    config, state = read_checkpoint(run / "checkpoint.pt", RUN_STATE)
    # MNIST is checked by its digests wherever it lies, so a copied run may find it elsewhere.
    config.epochs = args.epochs or config.epochs
    config.data_dir = args.data_dir or config.data_dir
    config.data_file = args.data_file or config.data_file
    return config, run, state


def prepare_out(config: Config, out: Path | None, overwrite: bool) -> Path:
    labels = f"n{config.num_labeled}" if config.num_labeled is not None else "file-labels"
    out = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.guide}-{config.elbo}-{labels}-s{config.seed}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to reuse it, or --resume {out} to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({e.strerror}); choose a folder you can write to") from None
    return out


def train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        config, out, state = resume_config(args)
    else:
        config = config_from_args(args)
    data = split(datasets.load(config.dataset, config.data_dir, config.data_file),
                 config.num_labeled, config.seed, config.num_train, unlabeled_valid=config.unlabeled_valid)
    if config.batch_size > len(data.x_labelled) + len(data.x_unlabelled):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(data.x_labelled) + len(data.x_unlabelled)} training images")
    if args.resume is None:
        hardware.choose_device(config.device)  # a device this machine lacks fails before a run folder is made
        out = prepare_out(config, args.out, args.overwrite)
    try:
        trainer = Trainer(config, out, data)  # resolves --precision auto, so config.json says what ran
        if args.resume is None:
            atomic_write_text(json.dumps(asdict(config), indent=2), out / "config.json")
        else:
            resume(trainer, state, out / "checkpoint.pt")
        print(f"run folder: {out}  ({config.dataset}, {trainer.num_l} labelled, {trainer.num_u} unlabelled, "
              f"{trainer.b_l}+{trainer.b_u} per step, guide {config.guide}, elbo {config.elbo}, lr {config.lr:g})")
        print(f"device {trainer.device}, precision {config.precision} ({trainer.precision_reason}): "
              f"{hardware.describe(trainer.device)}")
        summary = trainer.fit()
    except Stopped as stop:
        print(f"stopped by {stop} at epoch {trainer.epoch}, step {trainer.step_in_epoch}; "
              f"state saved; continue with: python run.py --resume {out}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        return output_closed(f"run.py: stopped at epoch {trainer.epoch}, step {trainer.step_in_epoch}, as the reader of "
                             f"its output went away (a pipe such as `| head`); state saved; continue with: "
                             f"python run.py --resume {out}")
    except WriteError as e:
        if (out / "checkpoint.pt").is_file():
            return fail(f"{e}; the last good checkpoint is kept: {e.remedy}, then python run.py --resume {out}")
        return fail(f"{e}; {e.remedy}, then run the same command with --overwrite")
    print(f"done: test accuracy {100 * summary['test_accuracy_at_best_valid']:.2f}% at the best "
          f"validation epoch {summary['best_epoch']} (validation {100 * summary['best_valid_accuracy']:.2f}%), "
          f"{summary['seconds_per_epoch']:.1f} s per epoch of training")
    for path in summary["figures"]:
        print(f"  figure: {path}")
    return 0


def resume(trainer: Trainer, state: dict, path: Path) -> None:
    try:
        trainer.load_state(state)
    except MISFIT as e:
        raise CheckpointError(f"{path}: its state does not fit the run its own config describes "
                              f"({first_line(e)}); {FIX}") from None
    print(f"resuming {path.parent} at epoch {trainer.epoch}, step {trainer.step_in_epoch}")


def explore_parser(command: str) -> Parser:
    p = Parser(prog=f"run.py {command}", description=getattr(explore, command).__doc__)
    p.add_argument("run", type=Path, help="a run folder (or its best.pt / checkpoint.pt)")
    if command in ("sample", "latent"):
        p.add_argument("--digit", type=int, help="a class by number: a digit 0-9 for MNIST, 0..K-1 otherwise")
    if command == "sample":
        p.add_argument("--n", type=positive(int), help="how many styles (default 64 of one digit, 8 rows of all)")
    if command == "evaluate":
        p.add_argument("--a-samples", type=positive(int), help="draws of a over which an sdgm or adgm run's "
                       "classifier averages q(y | a, x) (default: the run's --a-samples)")
    if command in ("evaluate", "analogies", "latent"):
        p.add_argument("--data-dir", help="folder holding the run's data set (default: the run's, then $SSVAE_DATA, ./data)")
    return p


def explore_run(command: str, argv: list[str]) -> int:
    args = explore_parser(command).parse_args(argv)
    run = explore.load_run(args.run)
    extra = {k: v for k, v in vars(args).items() if k != "run" and v is not None}
    if command == "evaluate":
        metrics, paths = explore.evaluate(run, **extra)
        print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%, test ELBO {metrics['test_elbo']:.2f} nats per image")
        print("per class: " + "  ".join(f"{name}: {100 * metrics[f'accuracy_{k}']:.1f}%"
                                        for k, name in enumerate(run.classes)))
    else:
        result = getattr(explore, command)(run, **extra)
        paths = result if isinstance(result, list) else [result]
    for path in paths:
        print(f"figure: {path}")
    return 0


EXPLORE = ("evaluate", "sample", "analogies", "latent", "animate")


def scheme(text: str) -> compare.Scheme:
    try:
        return compare.parse_scheme(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def compare_parser() -> Parser:
    p = Parser(prog="run.py compare", description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = compare.Settings()
    p.add_argument("schemes", nargs="+", type=scheme, metavar="SCHEME", help="GUIDE[:ELBO][:FIELD=VALUE,...]")
    add_shared_flags(p)
    p.add_argument("--seeds", type=positive(int), help=f"run every scheme at seeds 0..N-1 (default {d.seeds})")
    p.add_argument("--only-seeds", type=int, nargs="+", metavar="S", help="train these of the seeds alone, to split "
                   "the seeds over sessions or machines; the table holds every seed that has finished (default: all)")
    p.add_argument("--log-px-samples", type=positive(int), help=f"K, draws of z per digit for log p(x) (default {d.log_px_samples})")
    p.add_argument("--log-px-images", type=positive(int), help=f"test images log p(x) is estimated on (default {d.log_px_images})")
    p.add_argument("--grad-repeats", type=positive(int), help=f"gradient draws the variance is taken over (default {d.grad_repeats})")
    p.add_argument("--targets", type=fraction, nargs="+", help=f"accuracies to time, in (0, 1] (default {' '.join(map(str, d.targets))})")
    p.add_argument("--out", type=Path, help="comparison folder; an existing one with the same settings is continued (default: a new folder under runs/)")
    p.add_argument("--workers", type=positive(int), default=1, metavar="N",
                   help="sub-runs at a time, in N worker processes of T // N torch threads each, T being $SSVAE_THREADS or "
                   "one per core; each writes its output to its folder's log.txt (default 1: one after another in this process)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the sub-runs as Ray tasks, --workers N at a time, each asking "
                   "Ray for T // N CPUs, on the cluster at ADDRESS (local: a Ray instance started here); the tasks write "
                   "into --out, which must be on a filesystem every node shares (Ray is optional: pip install ray)")
    return p


def compare_settings(args: argparse.Namespace) -> compare.Settings:
    """The Settings that `run.py compare`'s flags ask for, the others at their defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in fields(compare.Settings)}}
    labels_and_data(args, given)
    return compare.Settings(**{**given, "targets": tuple(given.get("targets", compare.Settings.targets))})


def compare_schemes(argv: list[str]) -> int:
    args = compare_parser().parse_args(argv)
    settings = compare_settings(args)
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-compare-n{settings.num_labeled}"
    try:
        paths, failed = compare.compare(args.schemes, settings, out, args.workers, args.ray, args.only_seeds)
    except Stopped as stop:
        print(f"stopped by {stop}; finished sub-runs are kept; rerun the same command to continue {out}", file=sys.stderr)
        return 128 + stop.signum
    except WriteError as e:
        return fail(f"{e}; finished sub-runs are kept: {e.remedy}, then rerun the same command to continue {out}")
    if paths:
        print(f"comparison folder: {out}\n" + (out / "table.md").read_text())
    for path in paths.values():
        print(f"  written: {path}")
    if failed:
        others = "the table holds the others; " if paths else ""
        return fail(f"{len(failed)} sub-run(s) failed twice, each for the reason printed above: {', '.join(failed)}; "
                    f"{others}rerun the same command to train what is missing in {out}")
    return 0


def threads() -> int:
    """$SSVAE_THREADS if set, else torch's default (one per core)."""
    text = os.environ.get("SSVAE_THREADS", "").strip()
    if not text:
        return torch.get_num_threads()
    if not (text.isdecimal() and int(text) > 0):
        raise UsageError(f"environment variable SSVAE_THREADS={text!r} is not a whole number >= 1; set it to how "
                         f"many CPU threads to use (this machine has {os.cpu_count()} CPUs), or unset it")
    return int(text)


def fail(message: str, code: int = 1) -> int:
    """Report a failure in one line, as argparse does, and return the exit code."""
    print(f"run.py: error: {message}", file=sys.stderr)
    return code


def output_closed(message: str | None = None) -> int:
    """stdout's reader went away (`| head`): write nothing more there, say what was kept on
    stderr, and return the exit code of a process that SIGPIPE stopped, as Unix tools exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if message:
        print(message, file=sys.stderr)
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hardware.flush_denormals()  # before torch starts its threads, which inherit it
    # A line at a time, so that `| tee log.txt` shows each epoch as it ends, and `| head` stops a run at once.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        torch.set_num_threads(threads())
        if argv and argv[0] in EXPLORE:
            return explore_run(argv[0], argv[1:])
        if argv and argv[0] == "compare":
            return compare_schemes(argv[1:])
        return train(parser().parse_args(argv))
    except WriteError as e:
        return fail(f"{e}; {e.remedy}, then run the command again")
    except (UsageError, compare.CompareError, DataError, ValueError, NonFiniteError, explore.RunError,
            CheckpointError, hardware.DeviceError) as e:
        return fail(str(e), 2 if isinstance(e, (UsageError, compare.CompareError)) else 1)
    except BrokenPipeError:
        return output_closed()


if __name__ == "__main__":
    sys.exit(main())
