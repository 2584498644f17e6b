"""Benchmarks: measured speed and accuracy. Not tests: they take minutes.

    python benchmark.py speed [--steps S]
        The configuration of Pyro's ss_vae_M2 example (3000 labels, batch 200, y enumerated,
        auxiliary loss), S timed steps in fp32 and in bf16: ms per step, the FLOPs a step
        needs (counted by torch's FlopCounterMode), the matrix-multiply peak of this machine
        at the step's shapes, and the fraction of that peak a step reaches. Where the CPU has
        no native bf16 products (AVX2 only), 3 emulated bf16 steps, against fp32. Then the
        same figures for the main job's step (10% labels, the default networks and precision).

    python benchmark.py profile [--steps S]
        Where a step's milliseconds go (torch.profiler): matrix products, elementwise work,
        casts, the optimiser, and the Python of Pyro and the networks outside any kernel,
        beside the same steps timed without it (its self times overstate elementwise kernels):
        at Pyro's configuration in fp32 and bf16, then the main job's step (10% labels, the
        default networks and precision); then what the work between two epochs of the main
        job costs.

    python benchmark.py accuracy [--schemes m2 sdgm adgm] [--settings 0.1 100 600 1000 3000]
                                 [--seeds S] [--only-seeds S ...] [--epochs E] [--lr LR] [--workers N]
        Each setting (a labelled fraction if < 1, else a label count) is one comparison of the
        schemes (`run.py compare`'s SCHEME strings; default m2) at seeds 0..S-1 (default 1),
        all else at the defaults, in OUT/nN-eE (OUT/DATASET-nN-eE but for mnist): the folder
        that `run.py compare SCHEMES --num-labeled N --epochs E --seeds S --out OUT/nN-eE`
        writes. Then one table over schemes and settings, also written to OUT/accuracy.md:
        seconds per epoch, wall seconds (training plus evaluation), test accuracy at the best
        validation epoch (mean and 95% interval over seeds, best and worst seed), and the wall
        seconds until test accuracy first reaches 95% and 96%, over the seeds that reach it;
        and OUT/accuracy.png, test accuracy against labels, beside the published results on
        MNIST (Kingma et al.'s M2 and M1+M2, Pyro's example, Maaløe et al.'s). The runs of
        every setting share one queue of N workers (--workers N). A rerun reads finished runs
        back and continues stopped ones from their checkpoint; --only-seeds trains those seeds
        alone, so that the seeds can be split over sessions or machines.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import datasets
import figures
import hardware
from checkpoint import WriteError, atomic_write_text
from compare import CompareError, Scheme, Settings, compare_many, interval, parse_scheme, read_curve, read_finished
from data import DataError, Dataset, num_labeled_from_fraction, split
from evaluation import seconds_to_accuracy
from run import Parser, UsageError, output_closed, positive, threads
from run import scheme as scheme_argument
from train import DEVICES, Config, NonFiniteError, Stopped, Trainer, epoch_plan

WARM_UP = 5  # steps before timing: oneDNN's kernel cache, the allocator, autocast's weight casts
EMULATED_STEPS = 3  # steps timed in bf16 where the device has no native bf16 products
TARGETS = (0.95, 0.96)
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
CASTS = {"aten::copy_", "aten::_to_copy"}
GPU_BUSY = "GPU kernels (busy beside the host time above)"
# Published MNIST test accuracies (100 - error, %) at the label counts of Kingma et al.'s Table 1,
# drawn beside ours (README, "Few labels", says where each comes from).
PUBLISHED = {
    "Kingma M2": {100: 88.03, 600: 95.06, 1000: 96.40, 3000: 96.08},
    "Kingma M1+M2": {100: 96.67, 600: 97.41, 1000: 97.60, 3000: 97.82},
    "Pyro's M2 example": {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82},
    "Maaløe SDGM": {100: 98.68},
    "Maaløe ADGM": {100: 99.04},
}


def pyro_example_trainer(args: argparse.Namespace, precision: str, out: Path) -> tuple[Trainer, list]:
    """A Trainer at Pyro's ss_vae_M2 configuration, warmed up, and the rest of its epoch plan.
    Its networks have one hidden layer of 500, as the example's, whatever ssvae's default."""
    config = Config(num_labeled=3000, batch_size=200, hidden_layers=1, precision=precision, device=args.device,
                    data_dir=args.data_dir, dataset=args.dataset)
    trainer = Trainer(config, out, split(images(args), 3000, 0))
    plan = epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)
    for idx_l, idx_u in plan[:WARM_UP]:
        trainer.step(idx_l, idx_u)
    return trainer, plan[WARM_UP:WARM_UP + args.steps]


def images(args: argparse.Namespace) -> Dataset:
    return datasets.load(args.dataset, args.data_dir)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, plan: list) -> float:
    """Wall seconds of the training steps `plan`."""
    synchronize(trainer.device)
    start = time.perf_counter()
    for idx_l, idx_u in plan:
        trainer.step(idx_l, idx_u)
    synchronize(trainer.device)
    return time.perf_counter() - start


def timed_steps(precision: str, device: torch.device, steps: int) -> int:
    """How many steps to time: where bf16 is emulated (no AVX512-BF16 or AMX; 1.1 s against 62 ms
    per fp32 step on an AVX2-only EPYC) a few show that, and more would only take minutes."""
    return min(steps, EMULATED_STEPS) if emulated(precision, device) else steps


def emulated(precision: str, device: torch.device) -> bool:
    return precision == "bf16" and not hardware.native_bf16(device)


def speed(args: argparse.Namespace) -> None:
    device = hardware.choose_device(args.device)
    print(f"machine: {hardware.describe(device)}")
    ms = {}
    for precision in ("fp32", "bf16"):
        trainer, plan = pyro_example_trainer(args, precision, Path(args.out))
        plan = plan[:timed_steps(precision, device, args.steps)]
        if not emulated(precision, device):
            ms[precision] = rated_steps(precision, trainer, plan)
            continue
        # An emulated product's rate says nothing of the machine: the time against fp32 is the news.
        ms[precision] = 1000 * run_steps(trainer, plan) / len(plan)
        print(f"{precision}: {ms[precision]:.1f} ms per step, {250 * ms[precision] / 1000:.2f} s per 250-step epoch; emulated, "
              f"as this device has no native bf16 products: {ms['bf16'] / ms['fp32']:.1f} times the fp32 step "
              f"({len(plan)} steps timed), so --precision auto picks fp32 here")
    main_job, plan = main_job_trainer(args, Path(args.out) / "main-job")
    rated_steps(f"main job (10% labels, {main_job.config.hidden_layers} hidden layers, {main_job.config.precision})",
                main_job, plan[:args.steps])


def rated_steps(label: str, trainer: Trainer, plan: list) -> float:
    """Time the steps `plan`; print ms per step, the FLOPs of a step's matrix products, their rate,
    and its fraction of this machine's peak at the step's shapes. Returns ms per step."""
    with FlopCounterMode(display=False) as counter:
        trainer.step(*plan[0])
    per_step = run_steps(trainer, plan) / len(plan)
    flops = counter.get_total_flops()
    dtype = torch.bfloat16 if trainer.config.precision == "bf16" else torch.float32
    peak = hardware.matmul_rate(hardware.step_shapes(200, trainer.config.hidden_dim), dtype, trainer.device)
    achieved = flops / per_step
    print(f"{label}: {1000 * per_step:.1f} ms per step, {250 * per_step:.2f} s per 250-step epoch; "
          f"{flops / 1e9:.2f} GFLOP per step in matrix products = {achieved / 1e9:.0f} GFLOP/s, "
          f"{100 * achieved / peak:.0f}% of this machine's {peak / 1e9:.0f} GFLOP/s at the step's shapes "
          f"({trainer.b_l} labelled + {trainer.b_u} unlabelled per step)")
    return 1000 * per_step


def step_breakdown(trainer: Trainer, plan: list) -> dict[str, float]:
    """Milliseconds per step by kind of work, from the profiler's self times, and the same
    steps' time without the profiler. The self times can overstate elementwise kernels several
    times over while the step's total barely moves (an AVX2 EPYC: x * l reported at 5.3 ms,
    1.3 ms by a timer in the same profiled steps, 0.5 ms unprofiled; README, "Speed")."""
    unprofiled = run_steps(trainer, plan)
    on_gpu = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
        wall = run_steps(trainer, plan)
    ms = defaultdict(float)
    # On a GPU the other rows are host time and the kernels run beside it: their busy time is a row outside the sum.
    gpu_busy = sum(event.self_device_time_total for event in prof.key_averages() if event.device_type == DeviceType.CUDA)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = ("matrix products" if event.key in MATMULS else "casts and copies" if event.key in CASTS
                else "optimiser (fused Adam)" if "fused_adam" in event.key else "elementwise and reductions")
        ms[kind] += event.self_cpu_time_total / 1000 / len(plan)
    ms["outside kernels (Python: Pyro, autograd, modules)"] = 1000 * wall / len(plan) - sum(ms.values())
    ms["total"] = 1000 * wall / len(plan)
    ms["without the profiler"] = 1000 * unprofiled / len(plan)
    if on_gpu:
        ms[GPU_BUSY] = gpu_busy / 1000 / len(plan)
    return ms


def main_job_trainer(args: argparse.Namespace, out: Path) -> tuple[Trainer, list]:
    """A Trainer at the main job's setting (10% labels, every other setting at its default, the
    precision `auto` picks), warmed up, and the rest of its first epoch's plan."""
    trainer = Trainer(Config(device=args.device, data_dir=args.data_dir, dataset=args.dataset), out,
                      split(images(args), num_labeled_from_fraction(0.1), 0))
    plan = epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)
    for idx_l, idx_u in plan[:WARM_UP]:
        trainer.step(idx_l, idx_u)
    return trainer, plan[WARM_UP:]


def between_epochs(trainer: Trainer, out: Path) -> dict[str, float]:
    """Seconds of each piece of end-of-epoch work of `trainer`, after one more step."""
    (out / "figures" / "samples").mkdir(parents=True, exist_ok=True)
    elbo, class_loss = trainer.step(*epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)[0])
    trainer.running |= {"elbo": elbo, "class": class_loss}
    trainer.step_in_epoch = 1
    seconds = {}

    def timed(name: str, work) -> None:
        start = time.perf_counter()
        work()
        seconds[name] = time.perf_counter() - start

    timed("evaluation (held-out ELBO, validation and test accuracy)",
          lambda: trainer.rows.append(trainer.evaluate_epoch()))
    timed("sample grid", lambda: trainer.sample_grid(out / "figures" / "samples" / "grid.png", "benchmark"))
    timed("curves (every 5 epochs)", trainer.plot)
    timed("checkpoint", trainer.save_checkpoint)
    return seconds


def profile_step(args: argparse.Namespace) -> None:
    device = hardware.choose_device(args.device)
    print(f"machine: {hardware.describe(device)}")
    table = {}
    for precision in ("fp32", "bf16"):
        trainer, plan = pyro_example_trainer(args, precision, Path(args.out))
        label = f"{precision} (emulated here; {timed_steps(precision, device, args.steps)} steps)" \
            if emulated(precision, device) else precision
        table[label] = step_breakdown(trainer, plan[:timed_steps(precision, device, args.steps)])
    # The main job's step differs: two hidden layers by default, 20 labelled + 180 unlabelled images.
    main_job, plan = main_job_trainer(args, Path(args.out) / "main-job")
    table[f"main job, {main_job.config.precision}"] = step_breakdown(main_job, plan[:args.steps])
    print(f"\n| ms per step (Pyro's configuration: 3000 labels, one hidden layer; then the main job: 10% labels, "
          f"{main_job.config.hidden_layers} hidden layers) | {' | '.join(table)} |\n|---|{'---:|' * len(table)}")
    for kind in table["fp32"]:
        print(f"| {kind} | {' | '.join(f'{column[kind]:.1f}' for column in table.values())} |")
    print(f"\n| between two epochs (the main job, {main_job.config.precision}) | seconds |\n|---|---:|")
    for name, s in between_epochs(main_job, Path(args.out) / "main-job").items():
        print(f"| {name} | {s:.2f} |")


def accuracy_settings(args: argparse.Namespace, setting: float) -> Settings:
    """The comparison of one --settings entry: what `run.py compare` builds from --num-labeled N
    --epochs E --seeds S (and --lr, --unlabeled-valid, --dataset, --data-dir, --device as given)."""
    num_labeled = num_labeled_from_fraction(setting) if setting < 1 else int(setting)
    return Settings(num_labeled=num_labeled, epochs=args.epochs or Config.epochs, seeds=args.seeds,
                    lr=args.lr, unlabeled_valid=args.unlabeled_valid, dataset=args.dataset,
                    data_dir=args.data_dir, device=args.device)


def comparison_folder(args: argparse.Namespace, settings: Settings) -> Path:
    prefix = "" if args.dataset == "mnist" else f"{args.dataset}-"
    suffix = "-unlabeled-valid" if settings.unlabeled_valid else ""  # other data: never the same folder
    return Path(args.out) / f"{prefix}n{settings.num_labeled}-e{settings.epochs}{suffix}"


def finished_seeds(scheme: Scheme, settings: Settings, folder: Path) -> list[dict]:
    """The measurements and metrics.csv rows of each seed of `scheme` that finished."""
    runs = []
    for seed in range(settings.seeds):
        sub = folder / scheme.folder / f"seed-{seed}"
        if (sub / "evaluation.json").is_file():
            runs.append({**read_finished(scheme, seed, settings, sub), "rows": read_curve(sub)})
    return runs


def seconds_to(runs: list[dict], target: float) -> str:
    """Mean wall seconds to `target` over the seeds that reach it, and how many do if not all."""
    reached = [s for r in runs if math.isfinite(s := seconds_to_accuracy(r["rows"], target, with_evaluation=True))]
    if not reached:
        return "—"
    return f"{sum(reached) / len(reached):.0f}" + (f" ({len(reached)}/{len(runs)})" if len(reached) < len(runs) else "")


def accuracy_row(scheme: Scheme, settings: Settings, runs: list[dict]) -> str:
    accuracies = [100 * r["test_accuracy"] for r in runs]
    mean, half, n = interval(accuracies)
    spread = f"{mean:.2f} ± {half:.2f}%" if n > 1 else f"{mean:.2f}% (1 seed)"
    seeds = f"{n}" if n == settings.seeds else f"{n} of {settings.seeds}"
    per_epoch = sum(r["seconds_per_epoch"] for r in runs) / n
    wall = sum(row["seconds"] + row["eval_seconds"] for r in runs for row in r["rows"]) / n
    return (f"| {scheme.name} | {settings.num_labeled} | {seeds} | {settings.epochs} | {per_epoch:.1f} | {wall:.0f} "
            f"| {spread} | {max(accuracies):.2f}% .. {min(accuracies):.2f}% | "
            + " | ".join(seconds_to(runs, t) for t in TARGETS) + " |")


def accuracy(args: argparse.Namespace) -> None:
    lines, failed = [], []
    measured: dict[str, dict[int, list[float]]] = defaultdict(dict)  # scheme -> labels -> accuracy per seed
    comparisons = [(args.schemes, settings, comparison_folder(args, settings))
                   for settings in (accuracy_settings(args, setting) for setting in args.settings)]
    # One queue over every setting, so that --workers N keeps N runs going to the end.
    ran = compare_many(comparisons, args.workers, only_seeds=args.only_seeds)
    for (_, settings, folder), (_, failures) in zip(comparisons, ran):
        failed += [f"{name} at {settings.num_labeled} labels" for name in failures]
        for scheme in args.schemes:
            if runs := finished_seeds(scheme, settings, folder):
                lines.append(accuracy_row(scheme, settings, runs))
                measured[scheme.name][settings.num_labeled] = [100 * r["test_accuracy"] for r in runs]
    head = ("| scheme | labels | seeds | epochs | s / epoch | wall s (mean per seed) | test accuracy at best "
            "validation, mean ± 95% interval | best seed .. worst seed | "
            + " | ".join(f"s to {100 * t:g}%" for t in TARGETS) + " |")
    rule = "|---|" + "---:|" * (head.count("|") - 2)
    machine = f"{args.dataset}; machine: {hardware.describe(hardware.choose_device(args.device))}"
    table = "\n".join([machine, "", head, rule, *lines]) + "\n"
    print("\n" + table, end="")
    atomic_write_text(table, Path(args.out) / "accuracy.md")
    if measured:
        figures.plot_accuracy_by_labels(measured, PUBLISHED if args.dataset == "mnist" else {},
                                        Path(args.out) / "accuracy.png", f"{args.dataset}: test accuracy by labels")
    if failed:
        raise CompareError(f"{len(failed)} sub-run(s) failed twice, each for the reason printed above: "
                           f"{', '.join(failed)}; rerun the same command to train what is missing")


def parser() -> Parser:
    p = Parser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "profile", "accuracy"])
    p.add_argument("--schemes", type=scheme_argument, nargs="+", default=[parse_scheme("m2")], metavar="SCHEME",
                   help="schemes the accuracy benchmark compares, as run.py compare takes them: "
                   "GUIDE[:ELBO][:FIELD=VALUE,...] (default m2)")
    p.add_argument("--settings", type=positive(float), nargs="+", default=[0.1, 100, 600, 1000, 3000])
    p.add_argument("--seeds", type=positive(int), default=1, help="accuracy runs at seeds 0..N-1 (default 1)")
    p.add_argument("--only-seeds", type=int, nargs="+", metavar="S", help="train these of the seeds alone, as in "
                   "run.py compare; the table holds every seed that has finished (default: all)")
    p.add_argument("--epochs", type=positive(int), help="epochs per accuracy run (default: the run default)")
    p.add_argument("--lr", type=positive(float), help="Adam's peak learning rate of every scheme that sets no lr= "
                   "(default: by the guide's model, as in run.py)")
    p.add_argument("--unlabeled-valid", action="store_true",
                   help="accuracy runs also train on the validation images, unlabelled, as run.py --unlabeled-valid")
    p.add_argument("--workers", type=positive(int), default=1, metavar="N",
                   help="accuracy runs at a time, as in run.py compare (default 1: one after another in this process)")
    p.add_argument("--steps", type=positive(int), default=100, help="timed steps per precision, and for the main job's step, for speed and profile")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--dataset", choices=[d for d in datasets.DATASETS if d != "npz"], default="mnist",
                   help="the images; label counts need a class-balanced data set, so not a user's npz")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/ or FashionMNIST/raw/")
    p.add_argument("--out", default="runs/benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    hardware.flush_denormals()  # before torch starts its threads, which inherit it
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # as run.py: `| tee` shows each line as it comes
    try:
        torch.set_num_threads(threads())
        args = parser().parse_args(argv)
        {"speed": speed, "profile": profile_step, "accuracy": accuracy}[args.what](args)
    except Stopped as stop:
        print(f"benchmark.py: stopped by {stop}; finished runs are kept; rerun the same command to continue "
              f"{args.out}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        return output_closed("benchmark.py: stopped, as the reader of its output went away (a pipe such as "
                             "`| head`); accuracy keeps the runs it finished: rerun the same command to continue")
    except (UsageError, DataError, ValueError, NonFiniteError, WriteError, CompareError, hardware.DeviceError) as e:
        remedy = f"; {e.remedy}, then run it again" if isinstance(e, WriteError) else ""
        print(f"benchmark.py: error: {e}{remedy}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
