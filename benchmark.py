"""Benchmarks: measured seconds per epoch and test accuracy. Not tests: they take minutes.

    python benchmark.py accuracy [--epochs E] [--settings 0.1 100 600 1000 3000]
        Trains one run per setting (a labelled fraction if < 1, else a label count) with
        the default configuration and prints seconds per epoch and test accuracy per epoch,
        then a Markdown table of the results.

    python benchmark.py speed [--steps S]
        Times S training steps at the configuration of Pyro's ss_vae_M2 example (3000
        labels, batch 200, enumeration, auxiliary loss) in fp32 and in bf16, and prints
        seconds per 250-step epoch.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from checkpoint import WriteError
from data import DataError, load_mnist, num_labeled_from_fraction, split
from run import Parser, UsageError, positive
from train import Config, NonFiniteError, Trainer, epoch_plan


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def accuracy(args: argparse.Namespace) -> None:
    mnist = load_mnist(args.data_dir)
    results = []
    for setting in args.settings:
        num_labeled = num_labeled_from_fraction(setting) if setting < 1 else int(setting)
        config = Config(num_labeled=num_labeled, epochs=args.epochs or Config.epochs, data_dir=args.data_dir)
        out = Path(args.out) / f"n{num_labeled}"
        print(f"== {num_labeled} labels, {config.epochs} epochs -> {out}", flush=True)
        summary = Trainer(config, out, split(mnist, num_labeled, config.seed)).fit()
        results.append((num_labeled, config.epochs, summary))
    print(f"\nmachine: {machine()}")
    print("| labels | epochs | s / epoch | best epoch | test accuracy at best validation | final test accuracy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, epochs, s in results:
        print(f"| {n} | {epochs} | {s['seconds_per_epoch']:.1f} | {s['best_epoch']} "
              f"| {100 * s['test_accuracy_at_best_valid']:.2f}% | {100 * s['final_test_accuracy']:.2f}% |")


def speed(args: argparse.Namespace) -> None:
    mnist = load_mnist(args.data_dir)
    data = split(mnist, 3000, 0)
    print(f"machine: {machine()}")
    for precision in ("fp32", "bf16"):
        config = Config(num_labeled=3000, batch_size=200, precision=precision, data_dir=args.data_dir)
        trainer = Trainer(config, Path(args.out), data)
        plan = epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)
        for idx_l, idx_u in plan[:5]:  # warm-up: allocator and autocast caches
            trainer.step(idx_l, idx_u)
        start = time.perf_counter()
        for idx_l, idx_u in plan[5:5 + args.steps]:
            trainer.step(idx_l, idx_u)
        per_step = (time.perf_counter() - start) / args.steps
        print(f"{precision}: {1000 * per_step:.1f} ms per step, {per_step * len(plan):.2f} s per "
              f"{len(plan)}-step epoch ({trainer.b_l} labelled + {trainer.b_u} unlabelled per step)")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["accuracy", "speed"])
    p.add_argument("--settings", type=positive(float), nargs="+", default=[0.1, 100, 600, 1000, 3000])
    p.add_argument("--epochs", type=positive(int), help="epochs per accuracy run (default: the run default)")
    p.add_argument("--steps", type=positive(int), default=100, help="timed steps per precision for speed")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/")
    p.add_argument("--out", default="runs/benchmark")
    try:
        args = p.parse_args(argv)
        {"accuracy": accuracy, "speed": speed}[args.what](args)
    except (UsageError, DataError, ValueError, NonFiniteError, WriteError) as e:
        remedy = f"; {e.remedy}, then run it again" if isinstance(e, WriteError) else ""
        print(f"benchmark.py: error: {e}{remedy}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
