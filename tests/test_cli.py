"""The CLI contract: the commands a fresh clone must run, and one line + exit 2 for every named bad input."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lora4diffusion.cli import main


@pytest.fixture(scope="module")
def tiny_run(tiny_label_run):
    return tiny_label_run  # a tiny label run (conftest's, shared); `train` itself: the fresh-clone test


def _snapshot(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fresh_clone_commands_via_subprocess(tmp_path):
    run, out = tmp_path / "D", tmp_path / "S"
    cmd = [sys.executable, "-m", "lora4diffusion"]
    r = subprocess.run([*cmd, "train", "--preset", "tiny", "--out", str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "embedded MNIST" in r.stderr  # the one log line naming the data source
    r = subprocess.run(
        [
            *cmd,
            "sample",
            "--checkpoint",
            str(run),
            "--digits",
            "0-9",
            "--per-digit",
            "2",
            "--steps",
            "5",
            "--out",
            str(out),
            "--trajectory",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    data = np.load(out / "samples.npz")
    assert data["images"].dtype == np.float32 and data["images"].shape == (20, 28, 28)
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [
        d for d in range(10) for _ in range(2)
    ]
    assert 0 <= data["images"].min() and data["images"].max() <= 1
    assert (out / "samples.png").stat().st_size > 0 and (out / "trajectory.png").stat().st_size > 0


def test_sampling_is_bit_reproducible(tiny_run, tmp_path):
    args = [
        "-q",
        "sample",
        "--checkpoint",
        str(tiny_run),
        "--digits",
        "3,5",
        "--per-digit",
        "3",
        "--steps",
        "4",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (np.load(tmp_path / x / "samples.npz")["images"] for x in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ddpm_sampler_runs(tiny_run, tmp_path):
    assert (
        main(
            [
                "-q",
                "sample",
                "--checkpoint",
                str(tiny_run),
                "--digits",
                "1",
                "--per-digit",
                "2",
                "--sampler",
                "ddpm",
                "--steps",
                "10",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "o" / "samples.npz")["images"].shape == (2, 28, 28)


def _bad(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--digits", "12"], "12"),
        (["--digits", "3-1"], "3-1"),
        (["--digits", "a,b"], "a"),
        (["--steps", "0"], "--steps"),
        (["--steps", "5000"], "5000"),
        (["--guidance", "-1"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--per-digit", "0"], "--per-digit"),
        (["--sampler", "euler"], "euler"),
    ],
)
def test_sample_bad_options(tiny_run, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    _bad(capsys, ["sample", "--checkpoint", str(tiny_run), "--out", str(out), *extra], match)
    assert not out.exists()


def test_missing_and_corrupt_checkpoints(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    _bad(capsys, ["sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    data = (tiny_run / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _bad(capsys, ["sample", "--checkpoint", str(broken), "--out", str(out)], "model.safetensors")
    (broken / "model.safetensors").write_bytes(b"garbage")
    _bad(capsys, ["sample", "--checkpoint", str(broken), "--out", str(out)], "corrupt")
    (broken / "model.safetensors").write_bytes(data)
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg["unet"]["base_channels"] = 32
    (broken / "config.json").write_text(json.dumps(cfg))
    _bad(capsys, ["sample", "--checkpoint", str(broken), "--out", str(out)], "config")
    (broken / "config.json").write_text("{not json")
    _bad(capsys, ["sample", "--checkpoint", str(broken), "--out", str(out)], "config.json")
    assert not out.exists()


def test_out_is_a_file_is_refused_and_untouched(tiny_run, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    _bad(capsys, ["sample", "--checkpoint", str(tiny_run), "--out", str(f)], "is a file")
    _bad(capsys, ["train", "--preset", "tiny", "--out", str(f)], "is a file")
    assert f.read_text() == "keep me"


def test_train_bad_inputs_leave_existing_run_untouched(tiny_run, tmp_path, capsys):
    before = _snapshot(tiny_run)
    _bad(capsys, ["train", "--preset", "tiny", "--out", str(tiny_run)], "--resume")
    _bad(capsys, ["train", "--preset", "nope", "--out", str(tmp_path / "x")], "preset")
    _bad(
        capsys, ["train", "--preset", "tiny", "--image-size", "27", "--out", str(tmp_path / "x")], "divisible"
    )
    _bad(capsys, ["train", "--preset", "tiny", "--max-train-steps", "-3", "--out", str(tmp_path / "x")],
                  "--max-train-steps")
    assert _snapshot(tiny_run) == before
    assert not (tmp_path / "x").exists()


def test_idx_with_wrong_magic_is_refused(tmp_path, capsys):
    d = tmp_path / "mnist"
    d.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (d / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x99" + b"\x00" * 16))
    _bad(capsys, ["train", "--preset", "tiny", "--data", str(d), "--out", str(tmp_path / "x")], "magic")
    assert not (tmp_path / "x").exists()


def test_bad_input_via_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora4diffusion",
            "sample",
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_closed_stdout_pipe_ends_quietly(tiny_run, tmp_path):
    """`lora4diffusion sample ... | head -c 0`: the reader is gone before the summary line; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        r = subprocess.run(
            [sys.executable, "-m", "lora4diffusion", "-q", "sample", "--checkpoint", str(tiny_run),
             "--digits", "0", "--steps", "2", "--out", str(tmp_path / "s")],
            stdout=write_end, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "s" / "samples.npz").is_file()  # the work was done before the print failed
