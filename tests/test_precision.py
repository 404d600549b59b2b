"""bf16 or fp32 (precision.py): the CPU flags parser on real /proc/cpuinfo text, the default it leads to, the
environment override, explicit --bf16 / --no-bf16 winning over both, and the lines that say which was chosen.

The CPU's flags are monkeypatched wherever the outcome depends on them, so every test means the same on an
AMD EPYC with avx512_bf16, an Intel Xeon without it, or an ARM machine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lora4diffusion import precision
from lora4diffusion.cli import build_parser, main
from lora4diffusion.cli.common import precision as cli_precision
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.precision import ENV, Precision, choose_precision, default_precision, native_bf16_flag
from lora4diffusion.quick import ENV as QUICK_ENV
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, TrainConfig, prepare_run

CPU = torch.device("cpu")
# /proc/cpuinfo excerpts (one processor each) of the CPUs the default was measured on, and of their kin.
AMD_EPYC = (
    "processor\t: 0\n"
    "vendor_id\t: AuthenticAMD\n"
    "model name\t: AMD EPYC\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
    "nonstop_tsc cpuid extd_apicid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes "
    "xsave avx f16c rdrand hypervisor lahf_lm abm sse4a misalignsse 3dnowprefetch osvw topoext fsgsbase "
    "bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd "
    "sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi "
    "umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm\n"
    "bugs\t\t: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass srso\n"
)
CASCADE_LAKE = (
    "processor\t: 0\n"
    "vendor_id\t: GenuineIntel\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single pti "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid mpx avx512f avx512dq rdseed adx smap clflushopt "
    "clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves ida arat pku ospke avx512_vnni\n"
    "bugs\t\t: cpu_meltdown spectre_v1 spectre_v2 spec_store_bypass l1tf mds swapgs taa itlb_multihit "
    "mmio_stale_data\n"
)
SAPPHIRE_RAPIDS = (
    "processor\t: 0\n"
    "vendor_id\t: GenuineIntel\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8488C\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon rep_good nopl xtopology "
    "nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pdcm pcid sse4_1 sse4_2 "
    "x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 "
    "wbnoinvd ida arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize amx_bf16 "
    "avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities\n"
    "vmx flags\t: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority apicv tsc_offset "
    "vtpr mtf vapic\n"
)
GRAVITON3 = (
    "processor\t: 0\n"
    "BogoMIPS\t: 2100.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt "
    "fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg "
    "dcpodp svei8mm svebf16 i8mm bf16 dgh rng\n"
    "CPU implementer\t: 0x41\n"
    "CPU architecture: 8\n"
    "CPU part\t: 0xd40\n"
)
GRAVITON2 = (
    "processor\t: 0\n"
    "BogoMIPS\t: 243.75\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
    "dcpop asimddp ssbs\n"
    "CPU implementer\t: 0x41\n"
    "CPU part\t: 0xd0c\n"
)
NO_BF16_TEXT = "this CPU has no native bf16: bf16 would be slower; --bf16 forces it"


@pytest.mark.parametrize("text,flag", [
    (AMD_EPYC, "avx512_bf16"),  # Zen 4
    (CASCADE_LAKE, None),  # AVX-512 and VNNI, but no bf16 arithmetic: oneDNN would convert every operand
    (SAPPHIRE_RAPIDS, "amx_bf16"),  # AMX tiles (and avx512_bf16): the faster one is named
    (GRAVITON3, "bf16"),  # ARMv8.6 BF16 in the aarch64 Features line
    (GRAVITON2, None),
    (GRAVITON2.replace("ssbs", "ssbs svebf16"), None),  # SVE's bf16 alone: whole words only
    (CASCADE_LAKE.replace("avx512_vnni", "avx512_vnni avx_ne_convert"), None),  # converts, no arithmetic
    ("", None),
    ("processor\t: 0\nmodel name\t: Some CPU\n", None),  # no flags line at all
    ("flags\t\t: fpu sse sse2\nflags\t\t: fpu sse sse2 avx512_bf16\n", None),  # the first processor's line
])  # fmt: skip
def test_the_flags_parser_names_native_bf16(text, flag):
    assert native_bf16_flag(text) == flag


def test_without_proc_cpuinfo_the_flags_come_from_torch_else_are_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")  # macOS, Windows: no such file
    caps = {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False, "sve_max_length": 0}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    text = precision.cpu_flags()
    assert native_bf16_flag(text) == "avx512_bf16" and "amx_bf16" not in text and "x86_64" not in text
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # a torch without the probe
    assert precision.cpu_flags() is None
    (tmp_path / "cpuinfo").write_text(GRAVITON3)
    assert precision.cpu_flags() == GRAVITON3  # the file, where there is one


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags precision.py reads (None: unknown); no override in the environment, oneDNN's bf16
    kernels present (they are wherever those flags are)."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)

    def set_flags(text: str | None) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: text)

    return set_flags


@pytest.mark.parametrize("text,want", [
    (AMD_EPYC, "bf16 (the CPU has avx512_bf16)"),
    (SAPPHIRE_RAPIDS, "bf16 (the CPU has amx_bf16)"),
    (GRAVITON3, "bf16 (the CPU has bf16)"),
    (CASCADE_LAKE, f"fp32 ({NO_BF16_TEXT})"),
    (GRAVITON2, f"fp32 ({NO_BF16_TEXT})"),
    (None, "fp32 (this CPU's bf16 support is unknown; --bf16 forces bf16)"),
])  # fmt: skip
def test_the_cpu_default_is_bf16_only_where_the_cpu_has_it_natively(cpu_flags, text, want):
    cpu_flags(text)
    chosen = default_precision(CPU)
    assert str(chosen) == want and chosen.bf16 == want.startswith("bf16")


def test_without_onednn_bf16_kernels_the_default_is_fp32(cpu_flags, monkeypatch):
    cpu_flags(AMD_EPYC)
    monkeypatch.setattr(precision, "onednn_bf16", lambda: False)
    assert default_precision(CPU).bf16 is False and "oneDNN" in default_precision(CPU).why


def test_the_environment_sets_the_cpu_default(cpu_flags, monkeypatch):
    cpu_flags(CASCADE_LAKE)
    monkeypatch.setenv(ENV, "1")
    assert default_precision(CPU) == Precision(True, f"{ENV}=1")
    cpu_flags(AMD_EPYC)
    monkeypatch.setenv(ENV, "0")
    assert default_precision(CPU) == Precision(False, f"{ENV}=0")
    monkeypatch.setenv(ENV, "auto")  # as if unset
    assert default_precision(CPU) == Precision(True, "the CPU has avx512_bf16")
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(UserError, match=f"{ENV} must be 1 .* or 0 .*got 'yes'"):
        default_precision(CPU)


@pytest.mark.parametrize("flags,env", [(AMD_EPYC, None), (CASCADE_LAKE, None), (AMD_EPYC, "0"),
                                       (CASCADE_LAKE, "1")])
def test_an_explicit_request_wins_over_the_flags_and_the_environment(cpu_flags, monkeypatch, flags, env):
    cpu_flags(flags)
    if env is not None:
        monkeypatch.setenv(ENV, env)
    assert choose_precision(CPU, True) == Precision(True, "asked for")
    assert choose_precision(CPU, False) == Precision(False, "asked for")
    assert choose_precision(CPU, None) == default_precision(CPU)


@pytest.mark.parametrize("native,emulated,default,forced", [
    (True, True, "bf16 (the GPU has native bf16)", "bf16 (asked for)"),  # compute capability 8.0+
    (False, True, "fp32 (this GPU would emulate bf16; --bf16 forces it)", "bf16 (asked for)"),
    (False, False, "fp32 (this GPU has no bf16)", "fp32 (bf16 was asked for, but cuda cannot run it)"),
])  # fmt: skip
def test_on_cuda_the_default_is_native_bf16_and_a_request_needs_bf16_to_run(monkeypatch, native, emulated,
                                                                            default, forced):
    def is_bf16_supported(including_emulation: bool = True) -> bool:  # torch.cuda's, for a GPU of that kind
        return emulated if including_emulation else native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert str(choose_precision(cuda)) == default and str(choose_precision(cuda, True)) == forced
    assert str(choose_precision(cuda, False)) == "fp32 (asked for)"


# -------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv,want", [
    (["sample", "--out", "o"], f"fp32 ({NO_BF16_TEXT})"),
    (["sample", "--bf16", "--out", "o"], "bf16 (asked for)"),
    (["--bf16", "sample", "--out", "o"], "bf16 (asked for)"),  # before the command, as every shared option
    (["evaluate", "--checkpoint", "c", "--bf16"], "bf16 (asked for)"),
    (["serve", "--no-bf16"], "fp32 (asked for)"),
])  # fmt: skip
def test_the_cli_flags_win_over_the_default(cpu_flags, argv, want):
    cpu_flags(CASCADE_LAKE)
    assert str(cli_precision(build_parser().parse_args(argv), CPU)) == want
    cpu_flags(AMD_EPYC)
    native = "--bf16" in argv or ("--no-bf16" not in argv)
    assert cli_precision(build_parser().parse_args(argv), CPU).bf16 is native


def test_help_says_how_the_default_is_chosen(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "native bf16" in text and f"{ENV}=1|0" in text


def test_sample_says_its_precision_and_why(cpu_flags, tmp_path, capsys):
    """The summary line names the precision and its reason; the record keeps what ran."""
    cpu_flags(CASCADE_LAKE)
    runs = {"default": [], "forced": ["--bf16"]}
    for name, extra in runs.items():
        out = tmp_path / name
        argv = ["-q", "sample", "--digits", "1", "--per-digit", "1", "--steps", "1", "--out", str(out)]
        assert main(argv + extra) == 0
        line = capsys.readouterr().out.splitlines()[0]
        want = "bf16 (asked for)" if extra else f"fp32 ({NO_BF16_TEXT})"
        assert line.endswith(f", {want} on cpu"), line
        with np.load(out / "samples.npz", allow_pickle=False) as f:
            assert json.loads(str(f["parameters"]))["bf16"] is bool(extra)


def test_serve_says_its_precision_at_start(cpu_flags, monkeypatch, capsys):
    cpu_flags(CASCADE_LAKE)
    monkeypatch.setenv(QUICK_ENV, "1")  # loads the model, then says where it would listen
    assert main(["serve", "--port", "0"]) == 0
    assert f"sampling in fp32 ({NO_BF16_TEXT})" in capsys.readouterr().out
    assert main(["serve", "--port", "0", "--bf16"]) == 0
    assert "sampling in bf16 (asked for)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- the training loop
def _trainer(cfg: UNetConfig, run: Path, bf16: bool | None) -> Trainer:
    torch.manual_seed(0)
    train_cfg = TrainConfig(steps=1, batch_size=2, warmup=1, checkpoint_every=1, sample_every=0, bf16=bf16)
    images, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4)
    return Trainer(UNet(cfg), NoiseSchedule(DiffusionConfig(timesteps=10)), images, labels, train_cfg, run,
                   export=lambda m, d: None, device="cpu")


@pytest.mark.parametrize("flags,bf16,want", [
    (CASCADE_LAKE, None, f"fp32 ({NO_BF16_TEXT})"),
    (CASCADE_LAKE, True, "bf16 (asked for)"),
    (AMD_EPYC, None, "bf16 (the CPU has avx512_bf16)"),
    (AMD_EPYC, False, "fp32 (asked for)"),
])  # fmt: skip
def test_training_follows_the_same_choice_and_says_it(cpu_flags, small_cfg, tmp_path, caplog, flags, bf16,
                                                      want):
    cpu_flags(flags)
    trainer = _trainer(small_cfg, tmp_path / "run", bf16)
    assert trainer.use_bf16 is want.startswith("bf16")
    with caplog.at_level(logging.INFO, logger="lora4diffusion"):
        trainer.fit(progress=False)
    assert any(r.getMessage().startswith(f"training on cpu in {want}: ") for r in caplog.records)


def test_resume_keeps_the_saved_choice_auto_or_asked(cpu_flags, small_cfg, tmp_path):
    """None (the device's default) and True/False (asked for) both survive the train state's round trip."""
    cpu_flags(CASCADE_LAKE)
    for bf16 in (None, True, False):
        run = tmp_path / f"run_{bf16}"
        _trainer(small_cfg, run, bf16).fit(progress=False)
        assert (run / STATE_NAME).is_file()
        cfg, _, _ = prepare_run(TrainConfig(steps=2), run, resume=True, device="cpu")
        assert cfg.bf16 is bf16
    with pytest.raises(UserError, match="bf16 None -> True"):  # asking for one now is a change of settings
        prepare_run(TrainConfig(steps=2), tmp_path / "run_None", resume=True, device="cpu", bf16=True)
