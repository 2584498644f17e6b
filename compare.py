"""`run.py compare`: inference schemes trained on the same labelled subsets and seeds, side by side.

A scheme is a guide, an ELBO and options, written GUIDE[:ELBO][:FIELD=VALUE,...]:

    m2:enum  m2:trace  m2:graph  m2:iwae:num_particles=5  mean-field  relaxed  relaxed-hard
    delta  baseline  m2:trace:alpha=0  sdgm  adgm:trace

(no ELBO: the guide's first). Seed s fixes the labelled subset, the initial networks'
randomness and every draw, so at each seed the schemes differ in inference alone, and in
Adam's rate where their models' defaults differ (train.PEAK_LR: m2's guides 2e-3, sdgm and
adgm 1e-3); --lr gives every scheme one rate. Each scheme and seed is one `train.Trainer`
run, then measured:

    test_accuracy        test accuracy of the guide's classifier of record (argmax q(y | x);
                         E_q(a|x) q(y | a, x) for sdgm and adgm) at the best-validation epoch
    test_elbo            U(x) with y summed exactly, nats per test image (final networks)
    log_px               importance-sampled log p(x), K draws of z per digit, on the first
                         --log-px-images test images (final networks)
    grad_var_init/final  tr Cov of the gradient of U w.r.t. encoder_y's parameters, over
                         --grad-repeats draws on one fixed unlabelled minibatch, at
                         initialisation and after training
    seconds_per_epoch    training steps only; seconds_to_A: until test accuracy >= A

ELBO and log p(x) are left out (nan) where they bound nothing: the delta guide's q(z) has
no density, and the baseline never trains the decoder.

Sub-runs go one after another in this process, or with --workers N, N at a time in worker
processes (spawned; T // N torch threads each, T the threads this process has: $SSVAE_THREADS,
else one per core), or with --ray ADDRESS as Ray tasks, N at a time, each asking Ray for T // N
CPUs. Every sub-run reads its data itself (`load_split`) and writes its own folder; a worker's
output goes to that folder's log.txt, so the terminal holds the progress line alone. A sub-run
that raises or whose worker dies is tried once more; one that fails again is named, the tables
are written for the others and `run.py` exits non-zero. SIGINT or SIGTERM starts nothing more
and stops the training sub-runs at their next step.

OUT/
    compare.json            the settings; rerunning into OUT reuses finished sub-runs, continues
                            stopped ones from their checkpoint.pt and trains the others, whatever
                            --workers and wherever --data-dir (the data is checked by its digests)
    SCHEME/seed-S/          a run folder as `run.py` writes it, plus grad_var_init.json,
                            evaluation.json (and log.txt)
    results.csv             one row per scheme and seed
    summary.csv, table.md   mean and 95% interval over seeds, one row per scheme
    figures/accuracy.png, figures/gradient_variance.png
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import platform
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, redirect_stderr, redirect_stdout, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm import tqdm

import datasets
import figures
import hardware
from checkpoint import FIX, MISFIT, RUN_STATE, CheckpointError, atomic_write_csv, atomic_write_text, first_line
from data import Split, split
from evaluation import gradient_variance, log_px, seconds_to_accuracy
from guides import GUIDES
from inference import elbo_per_image
from train import LEGACY, Config, Stopped, Trainer, read_checkpoint

# Options a scheme may set, with their types; the rest of Config is shared by all schemes.
# The network sizes are shared, but a scheme may override them (sdgm::hidden_layers=2,z_dim=100).
SCHEME_OPTIONS: dict[str, type] = {"num_particles": int, "alpha": float, "lr": float, "beta1": float,
                                   "labeled_batch": int, "clip_norm": float, "clip_value": float,
                                   "weight_prior": float, "init_std": float, "classifier_dropout": float,
                                   "labeled_elbo_weight": float,
                                   "z_dim": int, "hidden_dim": int, "hidden_layers": int, "classifier_layers": int}
# 0.975 quantiles of Student's t for 1..10 degrees of freedom; beyond, a Cornish-Fisher series.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


class CompareError(Exception):
    """An output folder or setting that cannot work; the message says what to do."""


class SubRunError(Exception):
    """A sub-run failed in a worker; the message is the first line of its error, the
    traceback is in the sub-run's log.txt."""


@dataclass(frozen=True)
class Scheme:
    """A guide, the ELBO that trains it, and Config options of its own."""

    guide: str
    elbo: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.guide}:{self.elbo}" + (f":{opts}" if opts else "")

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_").replace(",", "_").replace("=", "-")


def parse_scheme(text: str) -> Scheme:
    """GUIDE[:ELBO][:FIELD=VALUE,...] -> Scheme; ValueError with a one-line reason."""
    guide, elbo, opts = (text.split(":") + ["", ""])[:3]
    if text.count(":") > 2 or guide not in GUIDES:
        raise ValueError(f"scheme {text!r}: write GUIDE[:ELBO][:FIELD=VALUE,...] with GUIDE one of "
                         f"{', '.join(sorted(GUIDES))}")
    elbos = GUIDES[guide].elbos
    elbo = elbo or elbos[0]
    if elbo not in elbos:
        raise ValueError(f"scheme {text!r}: guide {guide} works with {' or '.join(elbos)}, not {elbo}")
    options = []
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        key = key.replace("-", "_")
        if key not in SCHEME_OPTIONS or not value:
            raise ValueError(f"scheme {text!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(SCHEME_OPTIONS)}")
        try:
            options.append((key, SCHEME_OPTIONS[key](value)))
        except ValueError:
            raise ValueError(f"scheme {text!r}: {key} needs a {SCHEME_OPTIONS[key].__name__}, "
                             f"not {value!r}") from None
    return Scheme(guide, elbo, tuple(options))


@dataclass
class Settings:
    """What every scheme shares; saved as compare.json."""

    num_labeled: int | None = Config.num_labeled
    num_train: int | None = Config.num_train
    unlabeled_valid: bool = Config.unlabeled_valid
    epochs: int = Config.epochs
    seeds: int = 3
    batch_size: int = Config.batch_size
    z_dim: int = Config.z_dim
    hidden_dim: int = Config.hidden_dim
    hidden_layers: int = Config.hidden_layers
    lr: float | None = Config.lr  # a scheme's own lr=... overrides it
    a_samples: int = Config.a_samples
    precision: str = Config.precision
    device: str = Config.device
    log_px_samples: int = 100
    log_px_images: int = 1000
    grad_repeats: int = 50
    targets: tuple[float, ...] = field(default=(0.9, 0.95))
    data_dir: str | None = None
    dataset: str = Config.dataset
    data_file: str | None = None

    def config(self, scheme: Scheme, seed: int) -> Config:
        shared = {f.name: getattr(self, f.name) for f in fields(Config) if hasattr(self, f.name)}
        return Config(**{**shared, **dict(scheme.options)}, seed=seed, guide=scheme.guide, elbo=scheme.elbo)


def target_key(target: float) -> str:
    return f"seconds_to_{100 * target:g}"


@contextmanager
def set_aside_randomness() -> Iterator[None]:
    """Run the block without moving the RNGs or the param store that training goes on with,
    so that measuring before training leaves the run the one `run.py` would make."""
    rng, store = pyro.util.get_rng_state(), pyro.get_param_store()
    params = store.get_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(rng)
        store.clear()
        store.set_state(params)


def read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())  # json reads the NaN it writes for nan
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{path} cannot be read ({e}); {fix}") from None


def read_finished(scheme: Scheme, seed: int, settings: Settings, folder: Path) -> dict[str, Any]:
    """The measurements of a finished sub-run, checked: a damaged or edited file is named."""
    done, fix = folder / "evaluation.json", f"delete {folder} so that the comparison trains it again"
    row = read_json(done, fix)
    if not isinstance(row, dict):
        wrong = "it holds no JSON object"
    elif (row.get("scheme"), row.get("seed")) != (scheme.name, seed):
        wrong = f"it is for scheme {row.get('scheme')} at seed {row.get('seed')}"
    else:
        numbers = [key for key, *_ in metric_columns(settings)] + ["best_epoch", "final_test_accuracy", "train_seconds"]
        wrong = next((f"{key} is {row.get(key)!r}, not a number" for key in numbers
                      if type(row.get(key)) not in (int, float)), None)
    if wrong:
        raise CompareError(f"{done} is damaged or was edited ({wrong}); {fix}")
    return row


def read_curve(folder: Path) -> list[dict[str, float]]:
    """metrics.csv of a finished sub-run as numbers, checked."""
    path = folder / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if not rows or any({"epoch", "test_accuracy", "seconds"} - r.keys() for r in rows):
            raise ValueError("no rows, or no epoch, test_accuracy or seconds column")
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as e:
        raise CompareError(f"{path} is damaged or was edited ({first_line(e)}); "
                           f"delete {folder} so that the comparison trains it again") from None
    return rows


def load_split(settings: Settings, seed: int) -> Split:
    """The data of the sub-runs at `seed`. All of a comparison's data is read through here,
    by the process that trains on it: a worker reads the files rather than being sent them."""
    images = datasets.load(settings.dataset, settings.data_dir, settings.data_file)
    return split(images, settings.num_labeled, seed, settings.num_train, unlabeled_valid=settings.unlabeled_valid)


# The split this process loaded last: sub-runs go seed by seed, so that the next sub-run in
# the same process usually trains on the same one.
last_split: dict[tuple[str, int], Split] = {}


def cached_split(settings: Settings, seed: int) -> Split:
    key = (json.dumps(asdict(settings)), seed)
    if key not in last_split:
        last_split.clear()
        last_split[key] = load_split(settings, seed)
    return last_split[key]


def shared_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that every sub-run of a folder must share. Not the data folder: the data is
    checked by its digests wherever it lies, so a folder may be continued with it elsewhere."""
    return {key: value for key, value in settings.items() if key not in ("data_dir", "seeds")}


def stopped_state(folder: Path, config: Config) -> dict[str, Any] | None:
    """The run state a stopped sub-run saved in folder/checkpoint.pt, if it trains `config`
    (precision as the Trainer resolved it); None where there is none or it trains another."""
    path = folder / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        saved, state = read_checkpoint(path, RUN_STATE)
    except CheckpointError as e:
        raise CompareError(f"{str(e).removesuffix(f'; {FIX}')}; delete {folder} so that the comparison "
                           f"trains it again") from None
    saved_fields, fields_now = shared_settings(asdict(saved)), shared_settings(asdict(config))
    if saved_fields != fields_now:
        # E.g. --precision fp32 where the sub-run ran bf16: continuing would mix two runs.
        changed = ", ".join(f"{k} {saved_fields[k]} there, {v} here" for k, v in fields_now.items()
                            if saved_fields[k] != v)
        tqdm.write(f"{path} trains another configuration ({changed}); training {folder} from the start")
        return None
    return state


def variance_at_init(path: Path, measure: Callable[[], float], continuing: bool) -> float:
    """The gradient variance at initialisation, measured once and kept at `path`: a continued
    sub-run's networks are trained already (one that lacks the file is measured before it loads them)."""
    if continuing and path.is_file():
        value = read_json(path, f"delete {path} so that it is measured again")
        if type(value) not in (int, float):
            raise CompareError(f"{path} is damaged or was edited (it holds no number); "
                               f"delete it so that it is measured again")
        return value
    with set_aside_randomness():
        value = measure()
    atomic_write_text(json.dumps(value), path)
    return value


def precision_to_keep(folder: Path, precision: str) -> str:
    """`precision`, but under auto a stopped sub-run's own, from its config.json: as `run.py
    --resume` does, so that auto's timing at start-up, on a busy machine or on another one,
    neither splits one run into two precisions nor trains it again from the start."""
    if precision != "auto" or not (folder / "checkpoint.pt").is_file() or not (folder / "config.json").is_file():
        return precision
    ran = read_json(folder / "config.json", f"delete {folder} so that the comparison trains it again")
    kept = ran.get("precision") if isinstance(ran, dict) else None
    return kept if kept in ("bf16", "fp32") else precision


def run_scheme(scheme: Scheme, seed: int, data: Split, settings: Settings, folder: Path) -> dict[str, Any]:
    """Train one scheme at one seed in `folder` and measure it; a sub-run that was stopped
    part way continues from its checkpoint.pt."""
    done = folder / "evaluation.json"
    config = settings.config(scheme, seed)
    config.precision = precision_to_keep(folder, config.precision)
    trainer = Trainer(config, folder, data)  # resolves --precision auto, so config.json says what ran
    state = stopped_state(folder, config)
    atomic_write_text(json.dumps(asdict(config), indent=2), folder / "config.json")
    # One fixed minibatch of the training run's unlabelled size: a decaying-average baseline
    # trained on that size is measured as it was trained.
    g = torch.Generator().manual_seed(seed)
    pool = data.x_unlabelled if len(data.x_unlabelled) else data.x_labelled
    x_grad = torch.bernoulli(pool[:trainer.b_u or trainer.b_l], generator=g).to(trainer.device)
    x_test = torch.bernoulli(data.x_test, generator=g).to(trainer.device)
    trains_model = scheme.elbo != "none"
    bounds = trains_model and trainer.guide.z_has_density

    def variance() -> float:
        return gradient_variance(trainer.objective, x_grad, settings.grad_repeats) if trains_model else math.nan

    # Before load_state: the networks are still those at initialisation.
    grad_var_init = variance_at_init(folder / "grad_var_init.json", variance, continuing=state is not None)
    if state is not None:
        try:
            trainer.load_state(state)
        except MISFIT as e:
            raise CompareError(f"{folder / 'checkpoint.pt'} does not fit the sub-run it names ({first_line(e)}); "
                               f"delete {folder} so that the comparison trains it again") from None
        tqdm.write(f"continuing {folder} at epoch {trainer.epoch}, step {trainer.step_in_epoch}")
    summary = trainer.fit()
    model, guide = trainer.model, trainer.guide
    row = {
        "scheme": scheme.name, "guide": scheme.guide, "elbo": scheme.elbo, "seed": seed,
        "test_accuracy": summary["test_accuracy_at_best_valid"], "best_epoch": summary["best_epoch"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "test_elbo": elbo_per_image(model, guide, x_test) if bounds else math.nan,
        "log_px": log_px(model, guide, x_test[:settings.log_px_images], settings.log_px_samples)
        if bounds else math.nan,
        "grad_var_init": grad_var_init, "grad_var_final": variance(),
        "seconds_per_epoch": summary["seconds_per_epoch"], "train_seconds": summary["train_seconds"],
        **{target_key(t): seconds_to_accuracy(trainer.rows, t) for t in settings.targets},
    }
    atomic_write_text(json.dumps(row, indent=2), done)
    return row


def prepare(out: Path, settings: Settings) -> None:
    """Make OUT, or check that an existing OUT holds a comparison with the same settings but
    perhaps another number of seeds: each seed is a folder of its own, so a comparison can be
    given more seeds later, and compare.json then records the most it was asked for."""
    saved = out / "compare.json"
    current = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as they read back
    if saved.is_file():
        held = read_json(saved, "choose another --out")
        # A comparison saved before a setting existed ran it at the default of that time.
        defaults = {**json.loads(json.dumps(asdict(Settings()))), **LEGACY}
        if not isinstance(held, dict) or shared_settings({**defaults, **held}) != shared_settings(current):
            raise CompareError(f"--out {out} holds a comparison with other settings ({saved}); "
                               f"choose another --out, or repeat that comparison's flags to continue it")
        if settings.seeds > held.get("seeds", defaults["seeds"]):
            atomic_write_text(json.dumps({**held, "seeds": settings.seeds}, indent=2), saved)
        return
    if out.exists() and any(out.iterdir()):
        raise CompareError(f"--out {out} exists and holds no compare.json; choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"--out {out} cannot be written ({e.strerror}); choose a folder you can write to") from None
    atomic_write_text(json.dumps(current, indent=2), saved)


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, count) over the finite values."""
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    half = t975(n - 1) * finite.std().item() / math.sqrt(n) if n > 1 else math.nan
    return finite.mean().item(), half, n


def metric_columns(settings: Settings) -> list[tuple[str, str, float, str]]:
    """(key, column header, scale, number format) of each metric in the table."""
    return [
        ("test_accuracy", "test accuracy (%)", 100.0, ".2f"),
        ("test_elbo", "test ELBO (nats)", 1.0, ".2f"),
        ("log_px", f"log p(x), K={settings.log_px_samples} (nats)", 1.0, ".2f"),
        ("grad_var_init", "grad. variance, init", 1.0, ".3g"),
        ("grad_var_final", "grad. variance, final", 1.0, ".3g"),
        ("seconds_per_epoch", "s / epoch", 1.0, ".1f"),
        *[(target_key(t), f"s to {100 * t:g}%", 1.0, ".0f") for t in settings.targets],
    ]


def cell(values: Sequence[float], scale: float, fmt: str) -> str:
    mean, half, n = interval([scale * v for v in values])
    if n == 0:
        return "—"
    text = format(mean, fmt) + (f" ± {format(half, fmt)}" if math.isfinite(half) else "")
    return text + (f" ({n}/{len(values)} seeds)" if n < len(values) else "")


def write_tables(by_scheme: dict[str, list[dict[str, Any]]], settings: Settings, out: Path, threads: int,
                 workers: int) -> Path:
    """summary.csv (mean, 95% half-width and count per metric) and table.md; returns table.md."""
    columns = metric_columns(settings)
    summary = []
    for name, rows in by_scheme.items():
        entry: dict[str, Any] = {"scheme": name}
        for key, _, _, _ in columns:
            entry[f"{key}_mean"], entry[f"{key}_ci95"], entry[f"{key}_n"] = interval([r[key] for r in rows])
        summary.append(entry)
    atomic_write_csv(summary, out / "summary.csv")
    lines = ["| scheme | " + " | ".join(header for _, header, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    # A scheme with seeds still to train or failed (--only-seeds, a failure) says over how many its cells are.
    lines += [f"| {name}{f' ({len(rows)} of {settings.seeds} seeds)' if len(rows) < settings.seeds else ''} | "
              + " | ".join(cell([r[key] for r in rows], scale, fmt) for key, _, scale, fmt in columns)
              + " |" for name, rows in by_scheme.items()]
    s = settings
    # A scheme's options (GUIDE:ELBO:FIELD=VALUE) override the shared sizes, so say so where any has them.
    unless = " where a scheme's options do not set them" if any(name.count(":") == 2 for name in by_scheme) else ""
    notes = [
        (f"{s.dataset}, {s.num_labeled or 'its own'} labelled of {s.num_train or 'all'} training images{' and the validation images, unlabelled' if s.unlabeled_valid else ''}, {s.epochs} epochs, seeds 0..{s.seeds - 1}, "
         f"batch {s.batch_size}, z {s.z_dim}, hidden {s.hidden_layers} x {s.hidden_dim}{unless}, precision {s.precision}"
         f"{' (what it resolved to is in each sub-run config.json)' if s.precision == 'auto' else ''}; "
         f"{hardware.cpu_model()}, {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
         f"{threads} torch threads per sub-run, {workers} at a time."),
        ("Mean ± half-width of the 95% t-interval over seeds. Test accuracy at the best-validation epoch; "
         "ELBO, log p(x) and gradient variance of the final networks; — where a metric bounds nothing "
         "(delta: q(z) has no density; baseline: the decoder is never trained)."),
        (f"log p(x): importance-sampled, {s.log_px_samples} draws of z per digit, digits summed, on the first "
         f"{s.log_px_images} test images. Gradient variance: tr Cov of the gradient of the mean U(x) w.r.t. "
         f"encoder_y's parameters, over {s.grad_repeats} draws on one fixed unlabelled minibatch."),
        "Seconds: training steps only, evaluation excluded; s to A%: until test accuracy first reaches A%.",
    ]
    lines += [line for note in notes for line in ("", note)]
    return atomic_write_text("\n".join(lines) + "\n", out / "table.md")


@dataclass(frozen=True)
class Job:
    """A sub-run: one scheme at one seed of the comparison in `settings`, trained in `folder`
    (which names it: settings, unhashable, take no part in equality)."""

    scheme: Scheme
    seed: int
    folder: Path
    settings: Settings = field(compare=False)

    def run(self) -> dict[str, Any]:
        return run_scheme(self.scheme, self.seed, cached_split(self.settings, self.seed), self.settings, self.folder)


def run_subrun(job: Job, threads: int) -> dict[str, Any]:
    """The job in a worker process or a Ray task: with `threads` torch threads, its own data,
    and its output in its folder's log.txt rather than on the terminal the progress line is on."""
    hardware.flush_denormals()  # before this process's first parallel work starts torch's threads
    torch.set_num_threads(threads)
    job.folder.mkdir(parents=True, exist_ok=True)
    with open(job.folder / "log.txt", "a") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            return job.run()
        except Stopped:
            raise
        except Exception as e:
            traceback.print_exc()
            # Only the message goes back: not every exception survives pickling.
            raise SubRunError(first_line(e)) from e


class InProcess:
    """Sub-runs one after another in this process, training shown as it goes (--workers 1)."""

    slots = 1
    live = False  # submit returns when the sub-run has ended: the loop cannot watch it meanwhile

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        try:
            future.set_result(job.run())
        except Stopped:  # Trainer saved its state; nothing else runs, so stop at once
            raise
        except Exception as e:  # noqa: BLE001 - it fails this sub-run alone, as in a worker
            future.set_exception(e)
        return future

    def finished(self, future: Future) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class Workers:
    """`slots` worker processes, each in a pool of its own: a worker that dies breaks its own
    pool and fails its own sub-run alone, which is tried again in a fresh pool."""

    live = True  # sub-runs train beside the loop, which watches their epochs

    def __init__(self, slots: int, threads: int) -> None:
        self.slots, self.threads = slots, threads
        self.pools: dict[int, ProcessPoolExecutor] = {}
        self.lanes: dict[Future, int] = {}

    def submit(self, job: Job) -> Future:
        lane = min(set(range(self.slots)) - set(self.lanes.values()))
        if lane not in self.pools:
            # A worker ignores SIGINT but while training (Trainer.fit stops on it): this process
            # decides when to stop, and one Ctrl-C must not kill a worker that waits for work.
            self.pools[lane] = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                   initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        future = self.pools[lane].submit(run_subrun, job, self.threads)
        self.lanes[future] = lane
        return future

    def finished(self, future: Future) -> None:
        lane = self.lanes.pop(future)
        if isinstance(future.exception(), BrokenProcessPool):
            self.pools.pop(lane).shutdown(wait=False)

    def stop(self) -> None:
        # Repeated until every worker is idle: one busy before or after training ignores it.
        for process in multiprocessing.active_children():
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()


class RayTasks:
    """Sub-runs as Ray tasks on the cluster at `address` (`local`: a Ray instance started here),
    `slots` at a time, each asking Ray for `threads` CPUs. The tasks write the sub-run folders
    themselves, so the comparison folder must be on a filesystem every node shares."""

    live = True

    def __init__(self, address: str, slots: int, threads: int) -> None:
        try:
            import ray
        except ImportError:
            raise CompareError("--ray needs Ray, which is not installed: pip install ray") from None
        try:
            ray.init(address=None if address == "local" else address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CompareError(f"--ray {address}: cannot connect to Ray ({first_line(e)}); "
                               f"give the address of a running cluster, or local") from None
        self.ray, self.slots, self.threads = ray, slots, threads
        # Ray retries nothing itself: a sub-run is tried twice, as with local workers.
        self.task = ray.remote(num_cpus=threads, max_retries=0)(run_subrun)
        self.refs: dict[Future, Any] = {}

    def submit(self, job: Job) -> Future:
        ref = self.task.remote(replace(job, folder=job.folder.resolve()), self.threads)
        future = ref.future()
        self.refs[future] = ref
        return future

    def finished(self, future: Future) -> None:
        del self.refs[future]

    def stop(self) -> None:
        for ref in self.refs.values():
            self.ray.cancel(ref)  # a KeyboardInterrupt in the task, which Trainer.fit stops on

    def close(self) -> None:
        self.ray.shutdown()


Backend = InProcess | Workers | RayTasks


def why(error: BaseException) -> str:
    """One line on why a sub-run failed, whichever backend ran it."""
    if isinstance(error, BrokenProcessPool):
        return "its worker process died (killed, or out of memory?)"
    return first_line(getattr(error, "cause", None) or error)  # a Ray task's error wraps the sub-run's


def epochs_done(folder: Path) -> int:
    """The epochs a run folder's metrics.csv holds (written whole each epoch, so never half a row)."""
    try:
        with open(folder / "metrics.csv") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except FileNotFoundError:
        return 0


class Progress:
    """The comparison's progress line: sub-runs done, running (with the epochs each holds),
    failed and left, and the time left. A running sub-run's time left is its seconds per epoch
    in this invocation times the epochs it has to go; a sub-run still to start takes the mean
    duration of those this invocation finished, or before any has, the duration the running
    ones project (reused sub-runs took none). Not `live` (sub-runs in this process, which
    show their own epochs), the line is drawn only between sub-runs, so it names no epochs."""

    REFRESH = 30.0  # seconds between redraws while nothing starts or ends: a log file keeps every one

    def __init__(self, total: int, done: int, slots: int, live: bool = True) -> None:
        self.bar = tqdm(total=total, initial=done, bar_format="sub-runs {n}/{total} done{postfix}", dynamic_ncols=True)
        self.slots, self.live = slots, live
        self.started: dict[Job, tuple[float, int]] = {}  # when it started, the epochs it held then
        self.durations: list[float] = []
        self.shown = 0.0

    def start(self, job: Job) -> None:
        self.started[job] = (time.monotonic(), epochs_done(job.folder))

    def end(self, job: Job, finished: bool) -> None:
        seconds = time.monotonic() - self.started.pop(job)[0]
        if finished:
            self.durations.append(seconds)
            self.bar.update()

    def seconds_left(self, left: int, epochs: dict[Job, int]) -> float | None:
        """Seconds of work left, summed over the sub-runs (show divides by the slots), or None
        while nothing measures it yet."""
        now, to_go, projected = time.monotonic(), 0.0, []
        for job, (start, first) in self.started.items():
            if epochs[job] > first:
                per_epoch = (now - start) / (epochs[job] - first)
                to_go += per_epoch * (job.settings.epochs - epochs[job])
                projected.append(per_epoch * job.settings.epochs)
            elif self.durations:
                to_go += max(sum(self.durations) / len(self.durations) - (now - start), 0.0)
            else:
                return None
        if not left:
            return to_go
        known = self.durations or projected
        return to_go + left * sum(known) / len(known) if known else None

    def show(self, left: int, failed: int) -> None:
        self.shown = time.monotonic()
        epochs = {job: epochs_done(job.folder) for job in self.started}
        running = f"{len(self.started)} running"
        if self.started and self.live:
            total = {job.settings.epochs for job in self.started}
            of = f" of {total.pop()}" if len(total) == 1 else ""
            running += f" (epochs {', '.join(str(e) for e in epochs.values())}{of})"
        seconds = self.seconds_left(left, epochs)
        eta = "?" if seconds is None else tqdm.format_interval(seconds / self.slots)
        self.bar.set_postfix_str(f"{running}, {left} left" + (f", {failed} failed" if failed else "")
                                 + f", about {eta} to go")

    def tick(self, left: int, failed: int) -> None:
        """Show the line again if it is older than REFRESH seconds: the epochs move in between."""
        if time.monotonic() - self.shown >= self.REFRESH:
            self.show(left, failed)


def run_all(jobs: list[Job], backend: Backend, done: int) -> tuple[dict[Job, dict[str, Any]], dict[Job, str]]:
    """Run the jobs on the backend, each tried twice at most; returns the measurements of those
    that finished and why the others failed. On SIGINT or SIGTERM no more start, the running
    ones stop (training saves its state), and Stopped is raised. `done`: sub-runs finished before."""
    rows: dict[Job, dict[str, Any]] = {}
    failed: dict[Job, str] = {}
    pending, running, retried = deque(jobs), {}, set()
    progress = Progress(done + len(jobs), done, backend.slots, backend.live)
    signals: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (pending and not signals):
            while pending and len(running) < backend.slots and not signals:
                job = pending.popleft()
                tqdm.write(f"== {job.scheme.name}, seed {job.seed}: {job.folder}")
                progress.start(job)
                progress.show(len(pending), len(failed))
                running[backend.submit(job)] = job
            if signals:
                backend.stop()
            # A timeout, so that a signal is acted on while sub-runs are still going.
            for future in wait(running, timeout=1.0, return_when=FIRST_COMPLETED).done:
                job = running.pop(future)
                backend.finished(future)
                error = future.exception()
                progress.end(job, error is None)
                if error is None:
                    rows[job] = future.result()
                elif isinstance(error, Stopped):
                    signals.append(error.signum)
                elif signals:
                    pass  # cut short by the stop: not a failure, and continued by the next run
                elif job not in retried:
                    retried.add(job)
                    tqdm.write(f"!! {job.scheme.name}, seed {job.seed} failed: {why(error)}; trying it once more")
                    pending.appendleft(job)
                else:
                    failed[job] = why(error)
                    tqdm.write(f"!! {job.scheme.name}, seed {job.seed} failed again: {failed[job]}")
                progress.show(len(pending), len(failed))
            progress.tick(len(pending), len(failed))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        progress.bar.close()
    if signals:
        raise Stopped(signals[0])
    return rows, failed


Comparison = tuple[Sequence[Scheme], Settings, Path]  # schemes, what they share, the folder they go to


def plan(schemes: Sequence[Scheme], settings: Settings, out: Path) -> list[Job]:
    """The sub-runs of one comparison, seed by seed, so that an interrupted comparison already
    holds every scheme; its data and folder are checked first, so that a mistake is one line
    before any work."""
    data = cached_split(settings, 0)
    if settings.batch_size > len(data.x_labelled) + len(data.x_unlabelled):
        raise CompareError(f"--batch-size {settings.batch_size} is larger than the training set")
    prepare(out, settings)
    return [Job(scheme, seed, out / scheme.folder / f"seed-{seed}", settings)
            for seed in range(settings.seeds) for scheme in schemes]


def compare_many(comparisons: Sequence[Comparison], workers: int = 1, ray_address: str | None = None,
                 only_seeds: Sequence[int] | None = None) -> list[tuple[dict[str, Path], dict[str, str]]]:
    """Run every scheme at every seed of each comparison into its folder, then write the CSVs,
    table and figures of the sub-runs that finished. The sub-runs of all the comparisons share
    one queue, so that no worker waits while another comparison has work left. They run one
    after another in this process, or `workers` at a time in worker processes, or as Ray tasks
    on the cluster at `ray_address`. `only_seeds` trains those seeds alone, so that the seeds
    of one comparison can be split over sessions or machines; the tables hold every seed that
    has finished. Returns, per comparison, the files written and, by sub-run, why each that
    failed twice failed."""
    for _, settings, _ in comparisons:
        if outside := sorted(set(only_seeds or ()) - set(range(settings.seeds))):
            raise CompareError(f"--only-seeds {' '.join(map(str, outside))}: the comparison has seeds "
                               f"0..{settings.seeds - 1}; name seeds among them, or raise --seeds to cover them")
    # Torch threads per sub-run: those this process has ($SSVAE_THREADS, else one per core), shared.
    threads = max(1, torch.get_num_threads() // workers)
    if ray_address is None:  # a device this machine lacks fails once here, not twice in every sub-run
        for _, settings, _ in comparisons:
            hardware.choose_device(settings.device)
    # First, so that a backend that cannot start leaves no folder behind.
    backend = (RayTasks(ray_address, workers, threads) if ray_address
               else Workers(workers, threads) if workers > 1 else InProcess())
    try:
        plans = [plan(*comparison) for comparison in comparisons]
        if not isinstance(backend, InProcess):
            tqdm.write(f"{workers} sub-runs at a time, {threads} torch threads each; each writes its output "
                       f"to its folder's log.txt")
        jobs = list(dict.fromkeys(job for each in plans for job in each))  # a folder named twice runs once
        rows = {job: read_finished(job.scheme, job.seed, job.settings, job.folder) for job in jobs
                if (job.folder / "evaluation.json").is_file()}
        wanted = [job for job in jobs if job not in rows and (only_seeds is None or job.seed in only_seeds)]
        trained, failed = run_all(wanted, backend, len(rows))
    finally:
        backend.close()
    rows.update(trained)
    return [summarise(comparison, jobs, rows, failed, threads, workers) for comparison, jobs in zip(comparisons, plans)]


def compare(schemes: Sequence[Scheme], settings: Settings, out: Path, workers: int = 1,
            ray_address: str | None = None, only_seeds: Sequence[int] | None = None,
            ) -> tuple[dict[str, Path], dict[str, str]]:
    """One comparison: compare_many of it alone."""
    return compare_many([(schemes, settings, out)], workers, ray_address, only_seeds)[0]


def summarise(comparison: Comparison, jobs: list[Job], rows: dict[Job, dict[str, Any]], failed: dict[Job, str],
              threads: int, workers: int) -> tuple[dict[str, Path], dict[str, str]]:
    """The CSVs, table and figures of one comparison's finished sub-runs, and why the others failed."""
    schemes, settings, out = comparison
    failures = {f"{job.scheme.name} seed {job.seed}": reason for job, reason in failed.items() if job in jobs}
    done = {s: [job for job in jobs if job.scheme == s and job in rows] for s in schemes}
    by_scheme = {s.name: [rows[job] for job in done[s]] for s in schemes if done[s]}
    if not by_scheme:
        return {}, failures
    curves = {s.name: [read_curve(job.folder) for job in done[s]] for s in schemes if done[s]}
    variances = {name: {when: [r[f"grad_var_{when}"] for r in scheme_rows] for when in ("init", "final")}
                 for name, scheme_rows in by_scheme.items()}
    return {
        "results": atomic_write_csv([r for scheme_rows in by_scheme.values() for r in scheme_rows], out / "results.csv"),
        "table": write_tables(by_scheme, settings, out, threads, workers),
        "accuracy": figures.plot_scheme_accuracy(curves, out / "figures" / "accuracy.png"),
        "gradient_variance": figures.plot_gradient_variance(variances, out / "figures" / "gradient_variance.png"),
    }, failures
