"""The command line, hardened: bad flags are refused at the door, --out is never overwritten by accident,
a run folder has one trainer at a time, nothing non-finite is written, and exit statuses say what happened.

Every refusal: exit 2, one line on stderr, no traceback, and the files in --out unchanged (hashed).
"""

import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora4diffusion.catalog import pretrained_dir
from lora4diffusion.classifier import load_classifier
from lora4diffusion.cli import EXIT_INTERRUPTED, main
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model
from lora4diffusion.lora.adapters import Adapter, export_peft, import_peft, shipped_adapters
from lora4diffusion.runlock import LOCK_NAME
from lora4diffusion.training.base import train_base
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, NonFiniteLoss

BOLD = str(shipped_adapters()["bold-pixel"])  # the label adapter of the shipped pixel-base
PIXEL = str(pretrained_dir("pixel-base"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny base run (2 steps), a PEFT export of the shipped bold-pixel adapter, a few digits (DIGITS)."""
    root = tmp_path_factory.mktemp("hard")
    train_base("tiny", root / "tiny", steps=2, progress=False)
    assert main(["-q", "export-peft", "--lora", "bold-pixel", "--out", str(root / "peft")]) == 0
    _write_idx(root / DIGITS)
    return root


# `train-classifier --data WORK/DIGITS`: the tests of its lock need a writer that runs, not a good classifier;
# one epoch of the embedded 4,500 digits takes seconds, of these 200 a fraction of one
DIGITS = "digits"


def _write_idx(folder: Path) -> None:
    """An IDX folder of 200 real training digits and the 500 held-out ones (t10k: 50 of each class, as the
    held-out split takes), from the embedded subset."""
    from lora4diffusion.data import load_mnist

    def idx(arr: np.ndarray) -> bytes:
        magic = 0x801 if arr.ndim == 1 else 0x803
        return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()

    splits = load_mnist("embedded")
    folder.mkdir()
    for prefix, digits in (("train", splits.train), ("t10k", splits.heldout)):
        images, labels = digits.images.numpy(), digits.labels.numpy().astype(np.uint8)
        if prefix == "train":  # sorted by label: stride through them for every class
            images, labels = images[::22][:200], labels[::22][:200]
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx(np.ascontiguousarray(images)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(labels))


def _snapshot(folder):
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's errors exit from the parser
        return e.code


def _refused(capsys, argv, match, out=None):
    """exit 2, one stderr line containing ``match``, no traceback, ``out`` unchanged."""
    before = _snapshot(out) if out is not None else None
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, (match, err)
    if out is not None:
        assert _snapshot(out) == before, f"{argv}: --out changed"
    return err


# ----------------------------------------------------------------------------- the table: flags x commands
def _commands(work, out):
    o = str(out)
    return {
        "train": ["train", "--preset", "tiny", "--max-train-steps", "1", "--out", o, "--overwrite"],
        "train-lora": ["train-lora", "--checkpoint", str(work / "tiny"), "--style", "bold",
                       "--max-train-steps", "1",
                       "--out", o, "--overwrite"],
        "sample": ["sample", "--digits", "1", "--per-digit", "1", "--steps", "2", "--out", o, "--overwrite"],
        "evaluate": ["evaluate", "--checkpoint", PIXEL, "--digits", "1", "--per-digit", "2",
                     "--steps", "2"],
        "train-classifier": ["train-classifier", "--epochs", "1", "--out", o, "--overwrite"],
        "merge": ["merge", "--checkpoint", PIXEL, "--lora", "bold-pixel", "--out", o, "--overwrite"],
        "resize": ["resize", "--lora", "bold-pixel", "--rank", "1", "--out", o, "--overwrite"],
        "extract": ["extract", "--checkpoint", PIXEL, "--tuned", PIXEL, "--rank", "1", "--out", o,
                    "--overwrite"],
        "demo": ["demo", "--out", o, "--overwrite"],
    }  # fmt: skip


# (flag, value, what the message must say, commands that take the flag)
BAD_FLAGS = [
    ("--seed", str(2**64), "2**63", ["train", "train-lora", "sample", "evaluate", "train-classifier"]),
    ("--seed", str(2**63), "2**63", ["train", "sample"]),
    ("--seed", "-1", ">= 0", ["train", "sample"]),
    ("--lr", "nan", "finite", ["train", "train-lora"]),
    ("--lr", "inf", "finite", ["train"]),
    ("--lr", "0", "> 0", ["train", "train-lora"]),
    ("--lr", "-0.001", "> 0", ["train"]),
    ("--eta", "2", "<= 1", ["sample"]),
    ("--eta", "inf", "finite", ["sample"]),
    ("--eta", "nan", "finite", ["sample"]),
    ("--guidance", "inf", "finite", ["sample", "evaluate"]),
    ("--guidance", "nan", "finite", ["sample", "evaluate"]),
    ("--guidance", "-1", ">= 0", ["sample"]),
    ("--lora", "bold:1e30", "[-2, 2]", ["sample", "evaluate", "merge"]),
    ("--lora", "bold:-5", "[-2, 2]", ["sample", "evaluate", "merge"]),  # one limit for every weight
    ("--lora", "bold:999", "[-2, 2]", ["sample"]),
    ("--lora", "bold:2.5", "[-2, 2]", ["sample"]),
    ("--lora", "", "is empty", ["sample", "merge"]),  # was "--out ... is the input ."
    ("--lora", "bold:0.5:0.5:0.5", "more than two weights", ["sample"]),  # was "bold:0.5: file not found"
    ("--guidance", "1e6", "<= 30", ["sample", "evaluate"]),  # exited 0 with saturated noise
    ("--guidance", "31", "<= 30", ["sample"]),
    ("--digits", "", "empty digit list", ["sample", "evaluate"]),  # drew 0-9
    ("--digits", "\u0663", "is not a digit 0-9", ["sample", "evaluate"]),  # Arabic-Indic 3: drew a 3
    ("--digits", "\uff13", "is not a digit 0-9", ["sample"]),  # fullwidth 3
    ("--lora", "bold:inf", "finite", ["sample", "merge"]),
    ("--lora", "bold:nan", "finite", ["sample"]),
    ("--image-size", "0", "must be > 0", ["train"]),
    ("--image-size", "100000", "<= 128", ["train"]),
    ("--per-digit", "1000000000", "<= 10000", ["sample", "evaluate", "demo"]),
    ("--examples-per-digit", "1000000000", "<= 10000", ["train-lora"]),
    ("--per-digit", "0", "> 0", ["sample", "evaluate"]),
    ("--batch-size", "1000000000", "<= 4096", ["train", "train-lora"]),
    ("--batch-size", "0", "> 0", ["train"]),
    ("--steps", "0", "> 0", ["sample", "evaluate", "demo"]),
    ("--max-train-steps", "0", "> 0", ["train", "train-lora"]),
    ("--steps", str(10**12), "<= 1000000000", ["sample"]),
    ("--max-train-steps", str(10**12), "<= 1000000000", ["train"]),
    ("--max-train-steps", "1e3", "integer", ["train"]),
    ("--rank", "0", "> 0", ["train-lora", "resize", "extract"]),
    ("--rank", "100000", "<= 512", ["train-lora", "resize"]),
    ("--alpha", "nan", "finite", ["train-lora"]),
    ("--alpha", "1e30", "<= 10000", ["train-lora"]),
    ("--dropout", "1", "< 1", ["train-lora"]),
    ("--dropout", "nan", "finite", ["train-lora"]),
    ("--ema", "1", "< 1", ["train-lora"]),
    ("--epochs", "1000000", "<= 1000", ["train-classifier"]),
    ("--lora-steps", "0", "> 0", ["demo"]),
]
CASES = [(cmd, flag, value, match) for flag, value, match, cmds in BAD_FLAGS for cmd in cmds]


@pytest.mark.parametrize("cmd, flag, value, match", CASES, ids=[f"{c}{f}={v}" for c, f, v, _ in CASES])
def test_bad_flag_values_are_refused_and_out_untouched(work, tmp_path, capsys, cmd, flag, value, match):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")  # with --overwrite, only a *valid* run may write here
    argv = _commands(work, out)[cmd]
    if flag == "--lora" and "--lora" in argv:  # replace the command's own adapter
        i = argv.index("--lora")
        argv = argv[:i] + argv[i + 2 :]
    err = _refused(capsys, [*argv, flag, value], match, out)
    assert flag in err or flag == "--lora"


def test_seed_beyond_64_bits_has_no_traceback_in_a_fresh_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora4diffusion", "sample", "--seed", str(2**70), "--out",
                        str(tmp_path / "s")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "2**63" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_largest_seed_samples(tmp_path):
    out = tmp_path / "s"
    argv = ["-q", "sample", "--digits", "1", "--per-digit", "1", "--steps", "2", "--seed", str(2**63 - 1)]
    assert main([*argv, "--out", str(out)]) == 0
    assert np.isfinite(np.load(out / "samples.npz")["images"]).all()


# ----------------------------------------------------------------------------- refuse to overwrite
WRITERS = ["train", "train-lora", "sample", "train-classifier", "merge", "resize", "extract"]


@pytest.mark.parametrize("cmd", [*WRITERS, "export-peft", "import-peft"])
def test_non_empty_out_needs_overwrite(work, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's model")
    (out / "config.json").write_text("{}")
    if cmd == "export-peft":
        argv = ["export-peft", "--lora", "bold-pixel", "--out", str(out)]
    elif cmd == "import-peft":
        argv = ["import-peft", "--peft", str(work / "peft"), "--out", str(out)]
    else:
        argv = [a for a in _commands(work, out)[cmd] if a != "--overwrite"]
    _refused(capsys, argv, "--overwrite", out)


def test_overwrite_replaces_sample_output(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["-q", "sample", "--digits", "2", "--per-digit", "1", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    first = _snapshot(out)
    _refused(capsys, [*argv, "--seed", "3"], "--overwrite", out)
    assert main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert _snapshot(out) != first


def test_never_write_over_an_input(work, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(PIXEL, base)
    ow = "--overwrite"
    _refused(capsys, ["merge", "--checkpoint", str(base), "--lora", "bold-pixel", "--out", str(base), ow],
             "is the input", base)  # fmt: skip
    ad = tmp_path / "ad"
    shutil.copytree(BOLD, ad)
    _refused(capsys, ["resize", "--lora", str(ad), "--rank", "1", "--out", str(ad), "--overwrite"],
             "is the input", ad)  # fmt: skip
    _refused(capsys, ["export-peft", "--lora", str(ad), "--out", str(ad / "sub"), "--overwrite"],
             "is the input", ad)  # fmt: skip
    _refused(capsys, ["sample", "--checkpoint", str(base), "--out", str(base), ow], "is the input", base)
    _refused(capsys, ["train-lora", "--checkpoint", str(base), "--style", "bold", "--out", str(base), ow],
             "is the input", base)  # fmt: skip
    _refused(capsys, ["import-peft", "--peft", str(work / "peft"), "--out", str(work / "peft"), ow],
             "is the input", work / "peft")  # fmt: skip


def test_train_refuses_a_folder_holding_another_model(tmp_path, capsys):
    other = tmp_path / "model"
    shutil.copytree(PIXEL, other)  # config.json + model.safetensors, no train_state
    _refused(capsys, ["train", "--preset", "tiny", "--max-train-steps", "1", "--out", str(other)],
                      "--overwrite", other)
    _refused(capsys, ["train", "--preset", "tiny", "--out", str(other), "--resume"], "no training state",
             other)  # fmt: skip
    with pytest.raises(UserError, match="holds a model"):  # the Python API refuses too
        train_base("tiny", other, steps=1, progress=False)


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    denied = "/sys/lora4diffusion-denied"  # not writable, even for root
    t0 = time.perf_counter()
    for argv in (["train-classifier", "--epochs", "1"], ["train", "--preset", "tiny"], ["sample"],
                 ["train-lora", "--style", "bold"], ["merge", "--lora", "bold"], ["resize", "--lora", "bold",
                 "--rank", "1"], ["export-peft", "--lora", "bold-pixel"]):  # fmt: skip
        err = _refused(capsys, [*argv, "--out", denied], "permission denied")
        assert "corrupt" not in err
    assert time.perf_counter() - t0 < 10  # refused at the door, not after training


# ----------------------------------------------------------------------------- the lock and --resume
def test_a_live_lock_refuses_a_second_training_and_a_stale_one_is_taken_over(work, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(work / "tiny", run)
    before = _snapshot(run)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (run / LOCK_NAME).write_text(json.dumps(holder))
    resume = ["-q", "train", "--preset", "tiny", "--max-train-steps", "3", "--out", str(run), "--resume"]
    err = _refused(capsys, resume, f"pid {os.getpid()}")
    assert "in use" in err and _snapshot(run) == {**before, LOCK_NAME: _snapshot(run)[LOCK_NAME]}
    _refused(capsys, ["sample", "--out", str(run), "--overwrite"], "in use")  # nobody writes there meanwhile
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({**holder, "pid": dead.pid}))
    assert main(resume) == 0
    assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not (run / LOCK_NAME).exists()  # released when the training ended


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process identity needs Linux's /proc")
def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path, caplog):
    """A dead holder's pid, reused by an unrelated process (or after a reboot), must not keep the folder
    "in use" forever: the lock records the holder's start time and the boot id, and a mismatch is stale."""
    from lora4diffusion.runlock import RunLock, holder, process_identity

    me = RunLock(tmp_path).info  # what a lock written by this very process records
    assert {"boot_id", "pid_start"} <= set(me)
    lock = tmp_path / LOCK_NAME
    for info, live in [
        (me, True),  # the same process: held
        ({k: v for k, v in me.items() if k not in ("boot_id", "pid_start")}, True),  # an older lock: pid only
        ({**me, "pid_start": me["pid_start"] + 1}, False),  # this pid, but started at another time
        ({**me, "boot_id": "another-boot"}, False),  # written before a reboot
    ]:
        lock.write_text(json.dumps(info))
        assert (holder(tmp_path) is not None) == live, info
    with RunLock(tmp_path) as taken:  # the last, stale one is taken over with a note
        assert json.loads(lock.read_text()) == taken.info
    assert "stale lock" in caplog.text and not lock.exists()

    # the start time is field 22 of /proc/PID/stat even when the command name holds spaces and ')'
    odd = tmp_path / "a b) (c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while "a b) (c" not in Path(f"/proc/{child.pid}/stat").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start = process_identity(child.pid)["pid_start"]
        assert (uptime - 60) * ticks <= start <= (uptime + 1) * ticks  # started within the last minute
        assert start >= me["pid_start"]  # and after this test process
    finally:
        child.kill()
        child.wait()


def test_two_trainings_into_one_folder_one_is_refused(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora4diffusion", "-q", "train", "--preset", "tiny",
           "--max-train-steps", "100000",
           "--out", str(run)]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / LOCK_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and holder["started"]
        second = subprocess.run([*cmd[:-2], "--out", str(run), "--overwrite"], capture_output=True, text=True)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode in (EXIT_INTERRUPTED, 128 + signal.SIGTERM)


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["-q", "train", "--preset", "tiny", "--out", str(run)]
    assert main([*tiny, "--max-train-steps", "2", "--batch-size", "8", "--seed", "4"]) == 0
    before = _snapshot(run)
    err = _refused(capsys, [*tiny, "--resume", "--max-train-steps", "3", "--batch-size", "16"],
                            "batch-size 8 -> 16")
    assert "--allow-changes" in err and _snapshot(run) == before
    _refused(capsys, [*tiny, "--resume", "--max-train-steps", "3", "--lr", "0.1", "--seed", "5"],
                      "seed 4 -> 5", run)
    _refused(capsys, [*tiny, "--resume", "--overwrite"], "one of them", run)
    # unspecified settings are the run's own (batch 8, seed 4), so a plain --resume is no change
    assert main([*tiny, "--resume", "--max-train-steps", "3"]) == 0
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    assert (train_cfg["batch_size"], train_cfg["seed"], train_cfg["steps"]) == (8, 4, 3)
    assert main([*tiny, "--resume", "--max-train-steps", "4", "--batch-size", "16", "--allow-changes"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 16
    idx = _idx_folder(tmp_path / "idx")  # other data: the same digits minus the first 10
    err = _refused(capsys, [*tiny, "--resume", "--max-train-steps", "5", "--data", str(idx)], "data", run)
    assert "data_fingerprint" in err and "--allow-changes" in err


def _idx_folder(folder):
    """The embedded digits (less the first 10) as the four IDX files `--data FOLDER` reads."""
    from lora4diffusion.data import IDX_NAMES, load_mnist

    train = load_mnist("embedded").train
    images, labels = train.images[10:].numpy(), train.labels[10:].numpy().astype(np.uint8)
    folder.mkdir()
    for name, arr in zip(IDX_NAMES, (images, labels, images, labels), strict=True):
        magic = 0x803 if arr.ndim == 3 else 0x801
        head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        (folder / name).write_bytes(head + arr.tobytes())
    return folder


def test_lora_resume_refuses_other_style_and_other_base(work, tmp_path, capsys):
    base, other = work / "tiny", tmp_path / "other"
    shutil.copytree(base, other)
    state = load_file(other / "model.safetensors")
    state["conv_in.weight"] += 1e-3  # same architecture, other weights
    save_file(state, other / "model.safetensors")
    run = tmp_path / "lora"
    t = ["-q", "train-lora", "--batch-size", "4", "--rank", "2", "--out", str(run)]
    assert main([*t, "--checkpoint", str(base), "--style", "bold", "--max-train-steps", "1"]) == 0
    before = _snapshot(run)
    _refused(capsys, [*t, "--checkpoint", str(base), "--style", "thin", "--max-train-steps", "2",
                      "--resume"], "style", run)
    err = _refused(capsys, [*t, "--checkpoint", str(other), "--style", "bold", "--max-train-steps", "2",
                            "--resume"],
                   str(other), run)  # fmt: skip
    assert str(base) in err and "fingerprint" in err
    # a different base is refused even with --allow-changes
    _refused(capsys, [*t, "--checkpoint", str(other), "--style", "bold", "--max-train-steps", "2", "--resume",
                      "--allow-changes"], "fingerprint", run)  # fmt: skip
    assert _snapshot(run) == before


def test_lora_resume_is_bit_identical_to_one_run(work, tmp_path):
    # dropout 0.1: its masks must be drawn per step too, not from the process's global RNG stream
    t = ["-q", "train-lora", "--checkpoint", str(work / "tiny"), "--style", "bold", "--batch-size", "8",
         "--rank", "2", "--dropout", "0.1", "--device", "cpu"]  # fmt: skip
    assert main([*t, "--max-train-steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert main([*t, "--max-train-steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert main([*t, "--max-train-steps", "4", "--out", str(tmp_path / "b"), "--resume"]) == 0
    for name in ("adapter.safetensors", STATE_NAME):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


# ----------------------------------------------------------------------------- never emit garbage
def test_overflowing_sampler_writes_nothing(tmp_path, capsys, monkeypatch):
    """Guidance past its measured limit is refused at the door; a sampler that overflows all the same (here:
    the limit lifted for the test) is refused after sampling, before anything is written."""
    out = tmp_path / "s"
    base = ["-q", "sample", "--digits", "1", "--per-digit", "1", "--steps", "2", "--out", str(out)]
    _refused(capsys, [*base, "--guidance", "1e308"], "<= 30")
    assert not out.exists()
    from lora4diffusion.cli import sample as sample_cli
    from lora4diffusion.cli.args import finite_float

    monkeypatch.setitem(sample_cli.NUMBERS, "guidance", finite_float(0.0))
    (tmp_path / "rec").mkdir()
    np.savez(tmp_path / "rec" / "samples.npz", parameters=np.array(json.dumps({"guidance": 1e308})))
    _refused(capsys, [*base, "--from", str(tmp_path / "rec" / "samples.npz")], "non-finite")
    assert not out.exists()
    from lora4diffusion.pipeline import Pipeline

    with pytest.raises(UserError, match="non-finite"):  # the library has no guidance limit: its guard holds
        Pipeline.load(PIXEL).generate([1], steps=2, guidance=1e308)


def test_overflowing_merge_and_export_write_nothing(tmp_path, capsys):
    huge = tmp_path / "huge"
    shutil.copytree(BOLD, huge)
    tensors = load_file(huge / "adapter.safetensors")
    from safetensors import safe_open

    with safe_open(str(huge / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file({k: v * 1e20 for k, v in tensors.items()}, huge / "adapter.safetensors", metadata=meta)
    _refused(capsys, ["merge", "--checkpoint", PIXEL, "--lora", str(huge), "--out", str(tmp_path / "m")],
             "non-finite")  # fmt: skip
    assert not (tmp_path / "m").exists()
    nan = Adapter({k: v * float("nan") for k, v in tensors.items()}, 4, 4.0)
    with pytest.raises(UserError, match="non-finite"):
        export_peft(nan, tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- exit statuses and signals
def test_sigterm_in_the_loop_exits_75_with_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    real = Trainer._loss

    def term_at_3(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler asks the loop to stop after this step
        return real(self, step)

    monkeypatch.setattr(Trainer, "_loss", term_at_3)
    run = tmp_path / "run"
    assert main(["-q", "train", "--preset", "tiny", "--max-train-steps", "20", "--out",
                 str(run)]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().out
    assert load_file(run / STATE_NAME) and json.loads((run / "config.json").read_text())["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the CLI restored the handler
    monkeypatch.setattr(Trainer, "_loss", real)
    assert main(["-q", "train", "--preset", "tiny", "--max-train-steps", "6", "--out", str(run),
                 "--resume"]) == 0


def test_sigterm_before_the_loop_writes_nothing(tmp_path, monkeypatch, capsys):
    import lora4diffusion.training.base as data  # where `train` looks load_mnist up

    real = data.load_mnist

    def term_while_loading(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(data, "load_mnist", term_while_loading)
    run = tmp_path / "run"
    assert main(["-q", "train", "--preset", "tiny", "--out", str(run)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "SIGTERM" in err and "nothing" in err
    assert not run.exists()


def test_library_training_installs_no_signal_handler(tmp_path, monkeypatch):
    seen = []
    real = Trainer._loss

    def record(self, step):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return real(self, step)

    monkeypatch.setattr(Trainer, "_loss", record)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    train_base("tiny", tmp_path / "r", steps=2, progress=False)
    assert seen and all(s == before for s in seen)


def test_non_finite_loss_before_a_checkpoint_claims_none(tmp_path, monkeypatch, capsys):
    real = Trainer._loss
    def nan_at_3(self, step):
        return real(self, step) * (float("nan") if step == 3 else 1.0)

    monkeypatch.setattr(Trainer, "_loss", nan_at_3)
    with pytest.raises(NonFiniteLoss) as e:
        train_base("tiny", tmp_path / "a", steps=30, progress=False)  # first checkpoint at step 10
    assert "nothing to resume" in str(e.value) and "kept" not in str(e.value)
    assert main(["-q", "train", "--preset", "tiny", "--max-train-steps", "30", "--out",
                 str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "nothing to resume" in err


def test_ctrl_c_during_sample_is_one_line_exit_130(tmp_path):
    errf = tmp_path / "err.txt"
    cmd = [sys.executable, "-m", "lora4diffusion", "sample", "--per-digit", "50", "--steps", "1000",
           "--out", str(tmp_path / "s")]  # fmt: skip
    # the child gets SIGINT's default action even when this runner was started in the background (`cmd &`
    # without job control leaves SIGINT ignored, and an ignored signal stays ignored across exec)
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with errf.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=default_sigint)
        try:
            deadline = time.monotonic() + 60
            while "sampling" not in errf.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            proc.kill()  # no-op once it has exited; never leave a 1,000-step sampler running
    text = errf.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert text.strip().splitlines()[-1].strip().endswith("lora4diffusion: sample interrupted")
    assert not (tmp_path / "s").exists()


def test_out_of_memory_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from lora4diffusion.pipeline import Pipeline

    def oom(*a, **k):
        torch.empty(2**62, dtype=torch.uint8)  # more than any machine has: the allocator's own error

    monkeypatch.setattr(Pipeline, "generate", oom)
    assert main(["-q", "sample", "--digits", "1", "--per-digit", "1", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "out of memory" in err and "--batch-size" in err
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- sample --from: the record
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The sampling record of a real `sample` run (digits, one adapter) and of a prompt run."""
    root = tmp_path_factory.mktemp("record")
    argv = ["-q", "sample", "--digits", "3", "--per-digit", "1", "--steps", "2", "--lora", "bold:0.5"]
    assert main([*argv, "--out", str(root / "d")]) == 0
    assert main(["-q", "sample", "--prompt", "a sks seven", "--num", "1", "--steps", "2", "--lora",
                 "bold:0.5", "--out", str(root / "p")]) == 0  # fmt: skip
    read = lambda d: json.loads(str(np.load(root / d / "samples.npz")["parameters"]))  # noqa: E731
    return read("d"), read("p")


def _write_record(folder: Path, fmt: str, text: str) -> Path:
    """A samples.png / samples.npz whose record is ``text`` (written as `sample` writes it)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        np.savez(folder / "samples.npz", images=np.zeros((1, 28, 28), np.float32),
                 labels=np.zeros(1, np.int64), parameters=np.array(text, dtype=np.str_))  # fmt: skip
        return folder / "samples.npz"
    info = PngInfo()
    info.add_text("lora4diffusion", text)
    Image.new("L", (30, 30)).save(folder / "samples.png", pnginfo=info)
    return folder / "samples.png"


HUGE = 10**9
# (what the record's values become, or its whole text; what the one line must say); the digit record unless
# the change holds "prompts"
BAD_RECORDS = [
    ({"per_digit": HUGE}, "field 'per_digit' must be an integer > 0 and <= 10000"),  # hung
    ({"per_digit": 1e9}, "field 'per_digit' must be an integer > 0 and <= 10000"),
    ({"per_digit": 0}, "field 'per_digit' must be an integer > 0 and <= 10000"),  # silently became 8
    ({"prompts": ["a sks seven"], "num": HUGE}, "field 'num' must be an integer > 0 and <= 10000"),
    ({"steps": "abc"}, "field 'steps' must be an integer > 0"),  # traceback
    ({"steps": 2.5}, "field 'steps' must be an integer > 0"),
    ({"steps": True}, "field 'steps' must be an integer > 0"),
    ({"guidance": "nan"}, "field 'guidance' must be a finite number >= 0 and <= 30"),  # traceback
    ({"guidance": float("nan")}, "field 'guidance' must be a finite number >= 0 and <= 30"),
    ({"guidance": 1e6}, "field 'guidance' must be a finite number >= 0 and <= 30"),
    ({"eta": 5}, "field 'eta' must be a finite number >= 0 and <= 1"),  # "non-finite ... at guidance 1.25"
    ({"seed": 2**70}, "field 'seed' must be an integer >= 0"),  # accepted
    ({"seed": -3}, "field 'seed' must be an integer >= 0"),  # accepted
    ({"loras": "bold"}, "field 'loras' must be a list of [adapter, weight] pairs, got 'bold'"),  # traceback
    ({"loras": [["bold", 5]]}, "field 'loras', adapter 'bold': the weight must be a finite number in [-2, 2]"
     ),
    ({"loras": [["bold"]]}, "field 'loras' must hold [adapter, weight] or [adapter, TE weight, UNet weight"),
    ({"loras": [["", 1]]}, "field 'loras' must hold [adapter, weight] or"),
    ({"loras": [["bold", 1, 1, ""]]}, "field 'loras' must hold [adapter, weight] or"),
    ({"loras": [["bold", 1, 3]]}, "the weight must be a finite number in [-2, 2], got 3"),
    ({"prompts": "t"}, "field 'prompts' must be a non-empty list of prompts (text), got 't'"),
    ({"prompts": []}, "field 'prompts' must be a non-empty list"),
    ({"digits": []}, "field 'digits': empty digit list"),  # drew 0-9
    ({"digits": [12]}, "field 'digits': bad digit list '12': 12 in '12' is not a digit 0-9"),
    ({"digits": ["3"]}, "field 'digits' must be a list of digits 0-9"),
    ({"sampler": "euler"}, "field 'sampler' must be one of ddim, ddpm"),
    ({"bf16": "no"}, "field 'bf16' must be true or false"),
    ({"checkpoint": "a\0b"}, "field 'checkpoint' must be a model folder or name"),
    ({"checkpoint": 5}, "field 'checkpoint' must be a model folder or name"),
    ({"negative": ["x"]}, "field 'negative' must be text"),
    ({"foo": 1}, "unknown field 'foo'"),
    ({"prompts": ["a sks seven"], "digits": [3]}, "holds both 'prompts' and 'digits'"),
    ("[" * 100_000 + "]" * 100_000, "the sampling record is not valid JSON"),  # deep nesting
    ('{"seed": ' + "9" * 5000 + "}", "the sampling record is not valid JSON"),  # a 5000-digit integer
    ("[1, 2]", "the sampling record is not a JSON object"),
    ("x" * (2 << 20), "the sampling record holds"),  # 2 M characters
]


@pytest.mark.parametrize("fmt", ["png", "npz"])
@pytest.mark.parametrize("change, match", BAD_RECORDS, ids=[str(c)[:30] for c, _ in BAD_RECORDS])
def test_a_sampling_record_is_checked_like_the_flags(recorded, tmp_path, capsys, change, match, fmt):
    """`sample --from` puts every recorded value through the check its flag gets: one line naming the
    record, the field and what is allowed; exit 2; no --out."""
    if isinstance(change, dict):
        digits, prompts = recorded
        record = {**(prompts if "prompts" in change else digits), **change}
        text = json.dumps(record)
    else:
        text = change
    source = _write_record(tmp_path / "rec", fmt, text)
    out = tmp_path / "out"
    err = _refused(capsys, ["sample", "--from", str(source), "--out", str(out)], match)
    assert f"--from {source}" in err
    assert not out.exists()


def test_a_record_within_the_limits_still_redraws(recorded, tmp_path, capsys):
    """The checks refuse nothing that `sample` writes: both records sample again."""
    for i, record in enumerate(recorded):
        source = _write_record(tmp_path / f"rec{i}", "npz", json.dumps(record))
        assert main(["-q", "sample", "--from", str(source), "--out", str(tmp_path / f"o{i}")]) == 0


def test_a_record_file_that_is_not_ours_is_one_line(tmp_path, capsys):
    """A bare .npy, an npz whose `parameters` header claims 10^8 characters (400 MB), a PNG declaring
    2^31 x 2^31 pixels (the record is read without decoding pixels): one line, no allocation, no traceback."""
    bare = tmp_path / "bare.npz"
    with bare.open("wb") as f:
        np.save(f, np.zeros(3))
    _refused(capsys, ["sample", "--from", str(bare), "--out", str(tmp_path / "o")], "not a readable .npz")
    huge = tmp_path / "huge.npz"
    head = repr({"descr": "<U100000000", "fortran_order": False, "shape": ()}).encode()
    head += b" " * (63 - (len(head) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + b"x" * 64
    import zipfile

    with zipfile.ZipFile(huge, "w") as z:
        z.writestr("parameters.npy", npy)
    _refused(capsys, ["sample", "--from", str(huge), "--out", str(tmp_path / "o")],
             "the sampling record holds 100000000 characters")  # fmt: skip
    from test_fuzz import png_bomb

    (tmp_path / "bomb.png").write_bytes(png_bomb(2**31 - 1, 2**31 - 1))
    _refused(capsys, ["sample", "--from", str(tmp_path / "bomb.png"), "--out", str(tmp_path / "o")],
             "--from")  # fmt: skip
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- two samples, one --out
def test_two_samples_into_one_out_one_wins_and_the_other_is_refused(tmp_path):
    """Two real `sample --out D` processes started together: one exits 0, the other exits 2 with one line
    (the folder is in use by another sample, or already holds the winner's files), and D holds the winner's
    samples only (its seed in the record), no lock file left."""
    out = tmp_path / "s"
    procs = []
    for seed in (1, 2):
        cmd = [sys.executable, "-m", "lora4diffusion", "-q", "sample", "--digits", "0-9", "--per-digit", "4",
               "--steps", "20", "--seed", str(seed), "--out", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = 1 + [code for code, _ in results].index(0)
    loser = next(err for code, err in results if code == 2).strip()
    assert len(loser.splitlines()) == 1 and "Traceback" not in loser, loser
    assert "in use by another sample" in loser or "already holds files" in loser, loser
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert json.loads(str(f["parameters"]))["seed"] == winner
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "samples.png"]


# a `sample` process whose sampling waits until the file argv[1] exists: the lock is held for as long as the
# test needs, on any machine, without a long sampling
_PAUSED_SAMPLE = """
import pathlib, sys, time
from lora4diffusion.cli import main
from lora4diffusion.pipeline import Pipeline
real = Pipeline.generate
def paused(self, *a, **k):
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.02)
    return real(self, *a, **k)
Pipeline.generate = paused
sys.exit(main(sys.argv[2:]))
"""


def test_a_running_sample_holds_its_out_and_a_second_is_refused_at_once(tmp_path):
    """While one `sample` runs, a second into the same --out is refused naming it (pid, "sample"), even with
    --overwrite; the first then finishes with its files intact."""
    out, go = tmp_path / "s", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_SAMPLE, str(go), "-q", "sample", "--digits",
                              "0-9", "--per-digit", "2", "--steps", "2", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / LOCK_NAME).exists(), "the first sample never took the lock"
        second = subprocess.run([sys.executable, "-m", "lora4diffusion", "sample", "--digits", "1", "--out",
                                 str(out), "--overwrite"], capture_output=True, text=True)  # fmt: skip
        go.touch()
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "in use by another sample" in err and f"pid {first.pid}" in err
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        go.touch()
        first.kill()
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["images"].shape[0] == 20  # the first one's 10 x 2, not the second's 8
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "samples.png"]  # no lock left


# ----------------------------------------------------------------------------- concurrent writers
def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lora4diffusion", "-q", *argv]


# (argv without --out, a check that the folder holds that command's output whole)
TWO_WRITERS = {  # "{work}": the module's work folder
    "train-classifier": (["train-classifier", "--epochs", "1", "--device", "cpu", "--data",
                          f"{{work}}/{DIGITS}"], lambda out: load_classifier(out)),
    "merge": (["merge", "--checkpoint", PIXEL, "--lora", "bold-pixel"],
              lambda out: load_model(out)),
    "export-peft": (["export-peft", "--lora", "bold-pixel"],
                    lambda out: import_peft(out)),
}


@pytest.mark.parametrize("cmd", list(TWO_WRITERS))
def test_two_writers_into_one_folder_the_second_is_refused(work, tmp_path, cmd):
    """Two real processes: the first holds --out (paused right after it took the folder's lock), the second
    (even with --overwrite) gets one line naming the first, exit 2, and writes nothing; the first then
    finishes and its files are whole. Before the lock both exited 0 and one's files replaced the other's."""
    argv, check = TWO_WRITERS[cmd]
    argv = [a.format(work=work) for a in argv]
    out = tmp_path / "out"
    first = subprocess.Popen(_cli(*argv, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-command
        assert first.poll() is None and (out / LOCK_NAME).is_file(), "the first never took the lock"
        before = _snapshot(out)
        second = subprocess.run(_cli(*argv, "--out", str(out), "--overwrite"), capture_output=True, text=True)
        err = second.stderr.strip()
        assert second.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"{out} is in use by another lora4diffusion process (pid {first.pid} on" in err, err
        assert _snapshot(out) == before  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert not (out / LOCK_NAME).exists()  # released at the end
    check(out)  # the first's output, whole


def test_two_writers_started_together_exactly_one_writes(work, tmp_path):
    """No pause: two train-classifier runs started at once on one new folder. The emptiness check is made
    under the lock, so one writes and the other is refused (in use, or the folder already holds files)."""
    out = tmp_path / "out"
    argv = _cli("train-classifier", "--epochs", "1", "--device", "cpu", "--data", str(work / DIGITS), "--out",
                str(out))
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().strip()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.splitlines()) == 1 and ("in use" in refused or "already holds files" in refused)
    load_classifier(out)
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "classifier.safetensors"]


def _every_writer(work: Path, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Every command that writes an output folder: (argv without --out, files it must have written)."""
    diffusers = tmp / "exported-diffusers"
    return {
        "train-classifier": (["train-classifier", "--epochs", "1", "--data", str(work / DIGITS)],
                             ["classifier.safetensors"]),
        "train-vae": (["train-vae", "--preset", "tiny", "--max-train-steps", "1"], ["model.safetensors"]),
        "train": (["train", "--preset", "tiny", "--max-train-steps", "1"], ["train_state.safetensors"]),
        "train-lora": (["train-lora", "--checkpoint", str(work / "tiny"), "--style", "bold",
                        "--max-train-steps", "1"], ["adapter.safetensors"]),
        "sample": (["sample", "--checkpoint", PIXEL, "--digits", "1", "--per-digit", "1", "--steps", "1"],
                   ["samples.npz"]),
        "merge": (["merge", "--checkpoint", PIXEL, "--lora", "bold-pixel"], ["model.safetensors"]),
        "extract": (["extract", "--checkpoint", PIXEL, "--tuned", PIXEL, "--rank", "1"],
                    ["adapter.safetensors"]),
        "resize": (["resize", "--lora", "bold-pixel", "--rank", "1"], ["adapter.safetensors"]),
        "export-diffusers": (["export-diffusers", "--checkpoint", PIXEL], ["unet"]),
        "import-diffusers": ([f"--out={diffusers}", "import-diffusers", str(diffusers)],
                             ["model.safetensors"]),
        "export-lora": (["export-lora", "--lora", "bold-pixel", "--format", "kohya"],
                        ["bold-pixel.safetensors"]),
        "export-peft": (["export-peft", "--lora", "bold-pixel"], ["adapter_model.safetensors"]),
        "import-peft": (["import-peft", "--peft", str(work / "peft"), "--checkpoint", PIXEL],
                        ["adapter.safetensors"]),
        "reconstruct": (["reconstruct", "--per-digit", "1", "--digits", "1"], ["reconstructions.npz"]),
        "demo": (["demo", "--checkpoint", str(work / "tiny"), "--lora-steps", "1", "--per-digit", "1",
                  "--steps", "1"], ["report.html"]),
    }  # fmt: skip


@pytest.mark.parametrize("cmd", list(_every_writer(Path("w"), Path("t"))))
def test_every_writing_command_holds_its_out_folder_until_it_ends(work, tmp_path, monkeypatch, cmd):
    """Each command's output is written while it holds OUT/train.lock (so a second process is refused, as
    the two-process tests show), and the lock is gone when the command returns."""
    cli_main = importlib.import_module("lora4diffusion.cli.main")  # the module (cli.main is the function)
    argv, written = _every_writer(work, tmp_path)[cmd]
    if cmd == "import-diffusers":  # its input: a diffusers folder written first
        assert main(["-q", "export-diffusers", "--checkpoint", PIXEL, "--out", argv[0].split("=", 1)[1]]) == 0
        argv = argv[1:]
    out = tmp_path / "out"
    seen = []
    real = cli_main.release_outputs

    def at_the_end() -> None:  # what the folder holds when the command returns, before its lock goes
        lock = out / LOCK_NAME
        seen.append((json.loads(lock.read_text())["pid"] if lock.is_file() else None,
                     {p.name for p in out.iterdir()} if out.is_dir() else set()))
        real()

    monkeypatch.setattr(cli_main, "release_outputs", at_the_end)
    assert main(["-q", *argv, "--out", str(out)]) == 0
    (pid, held), = seen
    assert pid == os.getpid() and set(written) <= held, (pid, held)
    assert not (out / LOCK_NAME).exists() and set(written) <= {p.name for p in out.iterdir()}


def test_a_refused_command_leaves_no_folder_and_no_lock(tmp_path, capsys):
    """The lock creates --out before the work; a refusal after that (a bad adapter here) removes it again."""
    out = tmp_path / "new" / "out"
    _refused(capsys, ["merge", "--checkpoint", PIXEL, "--lora", "bold-pixel:1e30", "--out", str(out)],
             "[-2, 2]")
    _refused(capsys, ["merge", "--checkpoint", PIXEL, "--lora", str(tmp_path / "nope"), "--out", str(out)],
             "nope")
    assert not (tmp_path / "new").exists()


def test_the_run_lock_is_reentrant_within_a_process(tmp_path):
    """The command holds the folder; the Trainer (or anything it calls) may take the same lock again. Only
    the outermost release removes the file, and the folder where it created it and nothing was written."""
    from lora4diffusion.runlock import RunLock, check_free, held_here, holder

    folder = tmp_path / "a" / "b"
    with RunLock(folder) as outer:
        assert held_here(folder) and holder(folder) is None  # this process: never "in use" to itself
        check_free(folder)
        with RunLock(folder) as inner:
            assert inner.nested and (folder / LOCK_NAME).is_file()
        assert (folder / LOCK_NAME).is_file() and json.loads((folder / LOCK_NAME).read_text()) == outer.info
    assert not (tmp_path / "a").exists()  # created by the lock, empty: removed
    with RunLock(folder):
        (folder / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]  # kept, lock gone
    # another process sees the live holder
    code = ("import sys; from lora4diffusion.runlock import RunLock\n"
            "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e); sys.exit(2)")
    with RunLock(folder):
        r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert r.returncode == 2 and f"pid {os.getpid()}" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- smaller classes
def test_resume_to_fewer_steps_than_the_run_has_is_refused_and_touches_nothing(tmp_path, capsys):
    """A step-4 run resumed with --max-train-steps 2 printed "loss nan" and rewrote metrics.csv (cut back to
    step 2): refused now, every file unchanged. At exactly its step it trains nothing and changes nothing."""
    run = tmp_path / "run"
    tiny = ["-q", "train", "--preset", "tiny", "--out", str(run)]
    assert main([*tiny, "--max-train-steps", "4"]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    words = "is at step 4, past --max-train-steps 2; pass more than 4 steps to continue it (nothing was"
    err = _refused(capsys, [*tiny, "--resume", "--max-train-steps", "2"], words, run)
    assert str(run) in err
    lora = ["-q", "train-lora", "--checkpoint", str(run), "--style", "bold", "--out", str(tmp_path / "ad")]
    assert main([*lora, "--max-train-steps", "2"]) == 0
    _refused(capsys, [*lora, "--resume", "--max-train-steps", "1"], "is at step 2, past", tmp_path / "ad")
    assert main([*tiny, "--resume", "--max-train-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "step 4, no step trained" in out and "nan" not in out, out
    assert _snapshot(run) == before


def _model_commands(tmp: Path, npz: Path) -> dict[str, list[str]]:
    o = ["--out", str(tmp / "out")]
    return {
        "train-vae": ["train-vae", "--preset", "tiny", *o], "train": ["train", "--preset", "tiny", *o],
        "sample": ["sample", *o], "evaluate --samples": ["evaluate", "--samples", str(npz)],
        "evaluate --checkpoint": ["evaluate", "--checkpoint", PIXEL],
        "train-lora": ["train-lora", "--style", "bold", *o], "merge": ["merge", "--lora", "bold", *o],
        "extract": ["extract", "--tuned", PIXEL, "--rank", "1", *o],
        "train-classifier": ["train-classifier", *o], "reconstruct": ["reconstruct", *o],
        "serve": ["serve"], "demo": ["demo", *o],
    }  # fmt: skip


@pytest.mark.parametrize("cmd", list(_model_commands(Path(), Path())))
def test_device_cuda_without_cuda_is_refused_by_every_model_command(tmp_path, capsys, monkeypatch, cmd):
    """`evaluate --samples --device cuda` exited 0 on a machine without CUDA (the device was only read to
    sample); every command that runs a model now refuses it up front, before reading or writing."""
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((2, 28, 28), np.float32), labels=np.array([1, 2]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, [*_model_commands(tmp_path, npz)[cmd], "--device", "cuda"],
             "--device cuda: CUDA is not available (use --device cpu or auto)")
    assert not (tmp_path / "out").exists()


def test_a_cache_variable_naming_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    """LORA4DIFFUSION_CACHE pointing at a file: a NotADirectoryError traceback (downloads) or a late 'cannot
    write' (encoded latents); now one line naming the variable, before anything is downloaded or encoded."""
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("LORA4DIFFUSION_CACHE", str(cache))
    words = f"LORA4DIFFUSION_CACHE={cache} is a file, not a folder"
    _refused(capsys, ["train-classifier", "--data", "download", "--out", str(tmp_path / "c")], words)
    _refused(capsys, ["train", "--preset", "tiny", "--vae", "vae", "--max-train-steps", "1", "--out",
                      str(tmp_path / "t")], words)  # fmt: skip
    monkeypatch.setenv("LORA4DIFFUSION_CACHE", str(cache / "inside"))
    _refused(capsys, ["train-classifier", "--data", "download", "--out", str(tmp_path / "c")],
             f"lies inside {cache}, a file")
    assert not (tmp_path / "c").exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag", ["--italic-trigger", "--bold-trigger"])
def test_demo_refuses_an_empty_trigger_as_train_lora_does(tmp_path, capsys, flag):
    """`demo --italic-trigger ''` silently used the default trigger; refused now like `train-lora --trigger
    ''`, naming the flag, before anything is written."""
    out = tmp_path / "demo"
    err = _refused(capsys, ["demo", flag, "", "--out", str(out)], "trigger '' is not a reserved trigger word")
    assert err.split("error: ", 1)[1].startswith(f"{flag}: ") and not out.exists()
    _refused(capsys, ["train-lora", "--style", "bold", "--trigger", "", "--out", str(out)],
             "trigger '' is not a reserved trigger word")
