"""Device and precision choice (hardware.py), and that a run says and saves what it chose."""

import ctypes
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REAL_DATA

import hardware
import run
from train import Config, Trainer


@pytest.mark.parametrize("flags, rate_ratio, expected", [
    (frozenset({"avx2"}), 3.0, "fp32"),                      # no native bf16: never bf16
    (frozenset({"avx512_bf16"}), 1.1, "fp32"),               # native but not faster enough
    (frozenset({"avx512_bf16"}), 2.0, "bf16"),
    (frozenset({"amx_bf16", "amx_tile"}), 4.0, "bf16"),
])
def test_auto_precision_needs_native_and_measured_faster(monkeypatch, flags, rate_ratio, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "matmul_rate",
                        lambda shapes, dtype, device, repeats=10: rate_ratio if dtype == torch.bfloat16 else 1.0)
    precision, reason = hardware.choose_precision("auto", torch.device("cpu"), 200, 500)
    assert precision == expected and reason


def test_auto_precision_is_fp32_on_a_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "matmul_rate",
                        lambda shapes, dtype, device, repeats=10: 3.0 if dtype == torch.bfloat16 else 1.0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.choose_precision("auto", torch.device("cuda"), 200, 500)[0] == "fp32"
    assert hardware.choose_precision("bf16", torch.device("cuda"), 200, 500)[0] == "bf16"


HEAP_PROBE = """
import ctypes, hardware
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Mallinfo2, ctypes.c_void_p, [ctypes.c_void_p]
if KEEP:
    assert hardware.keep_freed_memory()
mapped = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)  # 16 MB: more than a step's largest tensor
mapped, heap = libc.mallinfo2().hblks - mapped, libc.mallinfo2().arena
libc.free(block)
print(mapped, libc.mallinfo2().arena == heap)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc's mallopt and mallinfo2 (glibc 2.33 or newer)")
def test_freed_memory_is_kept_for_reuse():
    """After keep_freed_memory, a 16 MB block comes from the heap and stays there once freed, so
    the next tensor reuses its pages; by glibc's defaults (a fresh process) it is a fresh mmap."""
    def probe(keep: int) -> list[str]:
        return subprocess.run([sys.executable, "-c", f"KEEP = {keep}\n{HEAP_PROBE}"], capture_output=True, text=True,
                              check=True, cwd=Path(hardware.__file__).parent).stdout.split()
    assert probe(1) == ["0", "True"]  # not mapped; the heap kept the freed block
    assert probe(0)[0] == "1"  # glibc's default: mapped on its own


DENORMAL_PROBE = """
import numpy as np, torch, run
torch.set_num_threads(2)
x = torch.from_numpy(np.full(1 << 22, 1e-40, dtype=np.float32))  # denormals, made on one thread
if FLUSH:
    assert run.main(["--epochs", "0"]) == 2  # a usage error, after the entry point set the mode
print(int((x * 1.5 != 0).sum()))  # a product split between torch's two threads
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86's DAZ/FTZ modes")
def test_denormals_are_flushed_in_every_thread():
    """run.py flushes denormals to zero before torch starts its threads, so that all of them
    inherit the mode; without it a product on denormals keeps every one of them."""
    def probe(flush: int) -> int:
        done = subprocess.run([sys.executable, "-c", f"FLUSH = {flush}\n{DENORMAL_PROBE}"], capture_output=True,
                              text=True, check=True, cwd=Path(hardware.__file__).parent)
        return int(done.stdout.split()[-1])
    assert probe(1) == 0
    assert probe(0) == 1 << 22


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    assert hardware.choose_precision("bf16", torch.device("cpu"), 200, 500)[0] == "bf16"


def test_matmul_rate_is_a_positive_flop_rate():
    rate = hardware.matmul_rate([(64, 32, 16)], torch.float32, torch.device("cpu"), repeats=2)
    assert 1e6 < rate < 1e15


def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.choose_device("auto") == torch.device("cpu")
    with pytest.raises(hardware.DeviceError, match="--device cuda"):
        hardware.choose_device("cuda")


def test_cuda_request_without_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SSVAE_DATA", str(REAL_DATA))  # the data is found, so the device is what fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert run.main(["--device", "cuda", "--num-train", "1000", "--num-labeled", "100", "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err
    assert not (tmp_path / "runs").exists()  # no empty run folder is left behind


def test_trainer_resolves_auto_precision_into_config(small_split, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    config = Config(num_labeled=200, num_train=2000, epochs=1, batch_size=100, z_dim=4, hidden_dim=16,
                    precision="auto", device="cpu")
    trainer = Trainer(config, tmp_path, small_split)
    assert config.precision == "fp32" and trainer.device == torch.device("cpu")
    assert trainer.data.x_test.device == trainer.device


def test_run_prints_and_saves_its_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSVAE_DATA", str(REAL_DATA))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto means this CPU, on a GPU machine too
    out = tmp_path / "r"
    code = run.main(["--num-train", "1000", "--num-labeled", "100", "--epochs", "1", "--batch-size", "100",
                     "--z-dim", "4", "--hidden-dim", "16", "--out", str(out)])
    assert code == 0
    assert "precision fp32 (this device has no native bf16 products)" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == "fp32" and saved["device"] == "auto"
