"""Teaching the frozen base a new style: LoRA training (and full fine-tuning, for comparison).

Both go through the one training loop in training/loop.py; only what is trainable and what is exported differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lora4diffusion.captions import EMPTY_PROMPT, all_captions, captions_for, check_placeholder
from lora4diffusion.catalog import PRETRAINED, resolve_checkpoint
from lora4diffusion.checkpoint import read_json
from lora4diffusion.data import Digits, load_mnist, to_model_range
from lora4diffusion.datasets import CaptionedImages, as_digits, layout_of, read_captioned
from lora4diffusion.diffusion import OBJECTIVE_FIELDS, DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.folders.text import load_text_parts
from lora4diffusion.folders.vae import load_attached_vae
from lora4diffusion.lora.adapters import base_fingerprint, save_adapter
from lora4diffusion.lora.embeddings import add_token, init_vectors
from lora4diffusion.lora.layers import METHODS, adapter_parameter_names, inject_lora, lora_summary
from lora4diffusion.lora.prompt_lora import (
    TE_TARGETS,
    TRIGGER_KEY,
    adapter_from_prompt_model,
    check_trigger_in,
    prompt_fingerprint,
)
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.styles import STYLES, load_style_data
from lora4diffusion.training.base import preview_grid
from lora4diffusion.training.latents import cached_latents
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.prompt_base import preview_prompts
from lora4diffusion.training.run import TrainConfig, data_fingerprint, prepare_run, seed_value
from lora4diffusion.training.scores import label_drawer, prompt_drawer, style_lora_scores
from lora4diffusion.training.validation import DiffusionValidation, caption_ids, heldout_inputs, heldout_style

log = logging.getLogger("lora4diffusion")


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float = 4.0
    # all-linear: the only preset that reached bold's targets in the 3-minute budget, at 45 k parameters
    # (attention 16 k: 91 % accuracy even at 600 steps; attention+conv 80 k: no better); benchmarks/RESULTS.md
    targets: str = "all-linear"
    init: str = "normal"  # the seed's N(0, 1/r); "kaiming" as PEFT
    rslora: bool = False
    dropout: float = 0.0
    method: str = "lora"  # lora | dora | loha | lokr (lora/layers.py METHODS)
    options: dict = field(default_factory=dict)  # the method's own options (LoKr: factor, decompose_both)
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): each pair's B trains at ratio x lr

    def check(self) -> None:
        """A UserError for an unknown method, an option it lacks, or a LoRA+ ratio out of (0, 1000]."""
        if self.method not in METHODS:
            raise UserError(f"unknown adapter method {self.method!r} (choose from {', '.join(METHODS)})")
        METHODS[self.method].check_options(self.options)
        if not 0 < self.loraplus_lr_ratio <= 1e3:
            raise UserError(f"the LoRA+ lr ratio must be in (0, 1000], got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio != 1.0 and not METHODS[self.method].up_keys:
            raise UserError(f"LoRA+ needs A/B pairs; {self.method} has none")

    def record(self) -> dict:
        """What a run records (and --resume compares): the fields, without the method, options and LoRA+
        ratio while they are LoRA's defaults, so runs from before they existed resume unchanged."""
        out = asdict(self)
        for key, default in (("method", "lora"), ("options", {}), ("loraplus_lr_ratio", 1.0)):
            if out[key] == default:
                del out[key]
        return out

    def lr_scale(self, name: str = "default") -> Callable[[str], float]:
        """A parameter's learning rate as a multiple of lr: the LoRA+ ratio for the B of each A/B pair of
        adapter ``name`` (its ``up_keys``), 1 for the rest."""
        ups = tuple(f".{k.split('.')[0]}.{name}." for k in METHODS[self.method].up_keys)
        ratio = self.loraplus_lr_ratio
        return lambda key: ratio if any(u in key for u in ups) else 1.0

    def inject(self, model: nn.Module, targets: str | list[str], name: str = "default") -> list[str]:
        """Add this adapter (method, rank, alpha, init, options) to ``model`` at ``targets``."""
        return inject_lora(model, targets, self.rank, self.alpha, name=name, init=self.init,
                           rslora=self.rslora, dropout=self.dropout, method=METHODS[self.method],
                           options=self.options)


def default_lora_train_config() -> TrainConfig:
    # 500 steps of 64 at 0.34 s/step (all-linear, r=4, bf16): ~2.8 minutes on 2 CPU cores. On the pixel base
    # 300 steps left bold at 94.4 % accuracy, 600 reached 95.0 % (benchmarks/RESULTS.md).
    return TrainConfig(
        steps=500,
        batch_size=64,
        lr=2e-3,
        warmup=20,
        ema_decay=0.0,
        label_dropout=0.1,
        log_every=10,
        checkpoint_every=100,
        sample_every=0,
    )


def _base_name(base: str | Path | None, path: Path) -> str:
    """What an adapter records as its base: no machine path for a shipped model ("shipped base")."""
    if base is None:
        return "shipped base"
    return f"shipped {path.name}" if path.resolve().parent == PRETRAINED.resolve() else str(path)


def load_base(base: str | Path | None) -> tuple[nn.Module, object, dict, Path]:
    path = resolve_checkpoint(base)
    if base is None and not (path / "config.json").is_file():
        raise UserError("no shipped base model in this install; pass --checkpoint DIR")
    model, diffusion, config = load_model(path)
    return model, diffusion, config, path


def train_lora(
    style: str,
    out: Path,
    base: str | Path | None = None,
    lora: LoRAConfig | None = None,
    data: str = "embedded",
    per_digit: int | None = None,
    resume: bool = False,
    full: bool = False,
    progress: bool = True,
    device: str | torch.device = "auto",
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    trigger: str | None = None,
    prior: bool = False,
    prior_weight: float = 1.0,
    text_encoder: bool = False,
    text_encoder_lr: float | None = None,
    pivotal: dict | None = None,
    objective: dict | None = None,
    caption_dropout: float | None = None,
    **overrides,
) -> dict:
    """Train a LoRA adapter (or, with ``full=True``, every weight) for ``style`` into run directory ``out``.

    Writes ``out/adapter.safetensors`` (LoRA) or ``out/config.json`` + ``model.safetensors`` (full).
    ``device``: auto (CUDA if available) | cpu | cuda; under torchrun every process calls this.
    ``should_stop``, ``overwrite``, ``allow_changes``: see training.loop.Trainer and training.run.prepare_run;
    ``--resume`` on another base than the run's is always refused (the base fingerprint is recorded in the
    state).
    ``trigger``, ``prior``, ``prior_weight``, ``text_encoder``, ``text_encoder_lr``: LoRA on a prompt base
    (lora/prompt_lora.py); a label base refuses them. A prompt base goes to ``train_prompt_lora``.
    ``data``: an MNIST source, or a captioned image folder (datasets.py: kohya's or imagefolder's layout),
    whose images are trained as they are (``style`` is then only its name), each repeated as its kohya
    folder says; a label base needs a digit in every caption or class, a prompt base trains on the captions.
    ``pivotal``: {"token", "num_vectors", "init_word"}: pivotal tuning (a new token trained with the LoRA).
    ``objective``: training-objective options (DiffusionConfig's ``OBJECTIVE_FIELDS``: loss, min_snr_gamma,
    noise_offset, huber_c, huber_schedule) for this adapter; unnamed ones are the base's, and the prediction
    type is always the base's (``adapter_diffusion``). ``caption_dropout``: prompt bases only, the share of
    captions replaced by the empty prompt (TrainConfig.label_dropout; default 0).
    """
    prompt = _is_prompt_base(base)
    lora = lora or _default_lora_config(prompt)
    lora.check()
    if prompt:
        return train_prompt_lora(style, out, base, lora, data, per_digit, resume, full, progress, device,
                                 compile, should_stop, overwrite, allow_changes, trigger=trigger, prior=prior,
                                 prior_weight=prior_weight, text_encoder=text_encoder,
                                 text_encoder_lr=text_encoder_lr, pivotal=pivotal, objective=objective,
                                 caption_dropout=caption_dropout, **overrides)
    given = {"--trigger": trigger is not None, "--prior": prior, "--text-encoder": text_encoder,
             "--pivotal": pivotal is not None,
             "--text-encoder-lr": text_encoder_lr is not None, "--prior-weight": prior_weight != 1.0,
             "--caption-dropout-rate": caption_dropout is not None}
    wrong = [flag for flag, on in given.items() if on]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: the base is a label model (no text); these need a prompt base"
                        " (train --conditioning text)")
    captioned = captioned_data(style, data, per_digit)  # before anything is written: may refuse
    if captioned is not None:
        as_digits(captioned, need_labels=True)  # a label base needs every digit
    cfg, out, device = prepare_run(
        default_lora_train_config(), out, resume, device, overwrite=overwrite, allow_changes=allow_changes,
        **overrides,
    )
    heldout = heldout_style(style, data) if cfg.validate_every else None  # before any work: may refuse
    model, base_diffusion, base_config, base_path = load_base(base)
    diffusion = adapter_diffusion(base_diffusion, objective)
    styled = load_style_data(style, data=data, per_digit=per_digit, seed=cfg.seed) if captioned is None else \
        as_digits(captioned, need_labels=True)
    vae = load_attached_vae(base_path, base_config)  # a latent base: LoRA learns in its VAE's latent space
    if vae is not None:
        images = cached_latents(vae, styled.images) if captioned is None else \
            cached_latents(vae, captioned.images)[captioned.expanded()]  # one latent per file (kohya's cache)
    else:
        images = to_model_range(styled.images, model.cfg.image_size)
    base_name = _base_name(base, base_path)  # no machine path in shipped adapters
    run_info = style_run_info(base_name, base_fingerprint(model), style, styled, per_digit, full, diffusion)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        summary = {"trainable_params": sum(p.numel() for p in model.parameters()), "share": 1.0}
    else:
        torch.manual_seed(cfg.seed)  # LoRA init
        lora.inject(model, lora.targets)
        s = lora_summary(model, "default")
        summary = {"trainable_params": s["lora_params"], "share": s["share"], "modules": s["modules"]}
        run_info["lora"] = lora.record()
    log.info(
        "%s: %d trainable parameters (%.2f%% of the base)",
        "full fine-tuning" if full else "LoRA",
        summary["trainable_params"],
        100 * summary["share"],
    )
    schedule = NoiseSchedule(diffusion)
    model.train()
    validation = None
    if heldout is not None:
        validation = DiffusionValidation(schedule, *heldout_inputs(heldout, model.cfg.image_size, vae))
    scores = None
    if cfg.score_every:  # against the base: the model as built (adapters off), before any step
        scores = style_lora_scores(label_drawer(schedule, vae), cfg.validation_images, prompts=False)
        scores.prime(model)

    def export(m: nn.Module, directory: Path, step: int) -> None:
        meta = adapter_meta(style, step, base_name, styled, cfg, lora, diffusion)
        if full:
            save_model(directory, m, diffusion, {"finetune": meta}, vae=vae)
        else:
            save_adapter(m, directory, "default", metadata=meta)

    return fit_adapter(
        model, schedule, images, styled.labels, cfg, out, export,
        preview=lambda m, p: preview_grid(m, schedule, p, vae=vae), run_info=run_info, summary=summary,
        device=device, compile=compile, should_stop=should_stop, resume=resume, allow_changes=allow_changes,
        progress=progress, lr_scale=None if full or lora.loraplus_lr_ratio == 1.0 else lora.lr_scale(),
        validation=validation, scores=scores,
    )


def style_run_info(base_name: str, fingerprint: str, style: str, styled: Digits, per_digit: int | None,
                   full: bool, diffusion: DiffusionConfig | None = None) -> dict:
    """What every adapter run records for --resume to compare: the base, the style and its data, and the
    training objective of ``diffusion`` (a change is refused unless --allow-changes, as other settings)."""
    info = {"base": base_name, "base_fingerprint": fingerprint, "style": style, "data": styled.source,
            "data_fingerprint": data_fingerprint(styled.images, styled.labels), "per_digit": per_digit,
            "full": full}
    if diffusion is not None:
        info["objective"] = diffusion.objective()
    return info


def adapter_diffusion(base: DiffusionConfig, objective: dict | None) -> DiffusionConfig:
    """The base's DiffusionConfig with an adapter's own objective options (``OBJECTIVE_FIELDS``).

    The prediction type is the base's: an adapter changes what the frozen network outputs, which must keep
    meaning what the base's output means to the sampler (eps or v); naming another one is refused.
    """
    given = {k: v for k, v in (objective or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OBJECTIVE_FIELDS))
    if unknown:
        raise UserError(f"unknown training objective option(s) {', '.join(unknown)}"
                        f" (known: {', '.join(OBJECTIVE_FIELDS)})")
    wanted = given.pop("prediction_type", base.prediction_type)
    if wanted != base.prediction_type:
        raise UserError(f"--prediction-type {wanted}: the base predicts {base.prediction_type}, and an"
                        " adapter trains with its base's prediction type (leave the option out)")
    return replace(base, **given)


def adapter_meta(style: str, step: int, base_name: str, styled: Digits, cfg: TrainConfig,
                 lora: LoRAConfig, diffusion: DiffusionConfig | None = None) -> dict:
    """The metadata every trained adapter file carries (its training record); ``objective`` (prediction type,
    loss, weighting, offset noise) only when it is not DDPM's default, so default adapters read as before."""
    meta = {"style": style, "steps": step, "base": base_name, "data": styled.source, "train": asdict(cfg),
            "target_spec": lora.targets}
    if diffusion is not None and diffusion.objective() != DiffusionConfig().objective():
        meta["objective"] = diffusion.objective()
    return meta


def fit_adapter(
    model: nn.Module,
    task,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    out: Path,
    export: Callable[[nn.Module, Path, int], None],
    preview: Callable[[nn.Module, Path], None],
    run_info: dict,
    summary: dict,
    device: torch.device,
    compile: bool,
    should_stop: Callable[[], bool] | None,
    resume: bool,
    allow_changes: bool,
    progress: bool,
    lr_scale: Callable[[str], float] | None = None,
    validation=None,
    scores=None,
) -> dict:
    """What label and prompt LoRA share once the model is adapted: the Trainer (``export(model, directory,
    step)`` writes the adapter), resume, fit, and the parameter counts in the summary."""
    trainer = Trainer(model, task, images, labels, cfg, out, lambda m, d: export(m, d, trainer.step),
                      preview=preview, run_info=run_info, device=device, compile=compile,
                      should_stop=should_stop, lr_scale=lr_scale, validation=validation, scores=scores)
    if resume:
        trainer.resume(allow_changes)
    result = trainer.fit(progress=progress)
    result.update(summary, out=str(out))
    return result


def captioned_data(style: str, data: str, per_digit: int | None, trigger: str | None = None,
                   tokenizer=None) -> CaptionedImages | None:
    """The captioned folder (kohya or imagefolder layout, datasets.py) that ``data`` names, read, its
    warnings logged one line each and its summary line logged; None when ``data`` is an MNIST source."""
    if not isinstance(data, str | Path) or layout_of(Path(data).expanduser()) is None:
        return None
    if style in STYLES:
        raise UserError(f"--style {style} restyles MNIST digits; a captioned --data folder is the style"
                        " itself (leave --style out, or give it a name)")
    if per_digit is not None:
        raise UserError("--examples-per-digit picks MNIST digits; a captioned --data folder is used whole")
    found = read_captioned(data, trigger=trigger, tokenizer=tokenizer)
    for note in found.warnings:
        log.warning("%s", note)
    log.info("%s", found.summary())
    return found


# ------------------------------------------------------------------------------------------ prompt bases
def _is_prompt_base(base: str | Path | None) -> bool:
    path = resolve_checkpoint(base)
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        cfg = read_json(config)
    except UserError:
        return False  # load_base names the problem
    unet = cfg.get("unet") if isinstance(cfg, dict) else None
    return isinstance(unet, dict) and unet.get("conditioning") == "text"


# LoRA on a prompt base: rank 16, 750 steps and an EMA of the adapter weights (benchmarks/RESULTS.md, "Recipe
# search"): with prior preservation and text-encoder LoRA, bold WITH its trigger went from 89.6 % accuracy
# (rank 4, 500 steps, no EMA) to 95.3 %, at 2.05x the base's ink, and 0.98x without its trigger.
# Without a trigger there is nothing to separate: a plain style LoRA reached 97.3 % / 1.77x in 400 steps
# (58 s, rank 16, no EMA; 300 samples), so PROMPT_LORA_PLAIN_STEPS.
PROMPT_LORA_RANK = 16
PROMPT_LORA_EMA = 0.995
PROMPT_LORA_STEPS = 750
PROMPT_LORA_PLAIN_STEPS = 400


def default_trigger_train_config(trigger: str | None = "sks") -> TrainConfig:
    # As default_lora_train_config, without caption dropout: the empty prompt is guidance's unconditional
    # branch and keeps the base's meaning (kohya's caption_dropout_rate defaults to 0 as well).
    steps = PROMPT_LORA_STEPS if trigger is not None else PROMPT_LORA_PLAIN_STEPS
    return replace(default_lora_train_config(), label_dropout=0.0, ema_decay=PROMPT_LORA_EMA, steps=steps)


def default_lora_config(base: str | Path | None) -> LoRAConfig:
    """train-lora's LoRA defaults for this base: rank 4 on a label base, PROMPT_LORA_RANK on a prompt base."""
    return _default_lora_config(_is_prompt_base(base))


def _default_lora_config(prompt: bool) -> LoRAConfig:
    return LoRAConfig(rank=PROMPT_LORA_RANK, alpha=float(PROMPT_LORA_RANK)) if prompt else LoRAConfig()


def train_prompt_lora(
    style: str,
    out: Path,
    base: str | Path | None,
    lora: LoRAConfig,
    data: str = "embedded",
    per_digit: int | None = None,
    resume: bool = False,
    full: bool = False,
    progress: bool = True,
    device: str | torch.device = "auto",
    compile: bool = False,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    trigger: str | None = None,
    prior: bool = False,
    prior_weight: float = 1.0,
    text_encoder: bool = False,
    text_encoder_lr: float | None = None,
    pivotal: dict | None = None,
    objective: dict | None = None,
    caption_dropout: float | None = None,
    **overrides,
) -> dict:
    """LoRA on a prompt base (lora/prompt_lora.py): styled digits captioned with ``trigger`` (or plain
    captions without one), optional prior preservation and text-encoder LoRA. Same run folder, resume and
    export contract as ``train_lora``; writes ``out/adapter.safetensors``. ``caption_dropout``: the share
    of captions (styled and prior) replaced by the empty prompt, kohya's caption_dropout_rate (default 0).

    ``pivotal`` ({"token": "<bold-ti>", "num_vectors": n, "init_word": w}): pivotal tuning (cloneofsimo/lora,
    diffusers' advanced DreamBooth --train_text_encoder_ti): a new placeholder token takes the trigger's
    place in the captions and its vectors (lora/embeddings.py) train together with the LoRA; the adapter
    file carries them (A1111's bundled embeddings)."""
    if full:
        raise UserError("--full on a prompt base is not supported: train LoRA (or fine-tune with train)")
    if prior and trigger is None and pivotal is None:
        raise UserError("--prior needs --trigger: prior preservation keeps trigger-less prompts as the base")
    if not prior and prior_weight != 1.0:
        raise UserError("--prior-weight goes with --prior")
    if not (0.0 <= prior_weight <= 1e3) or prior_weight != prior_weight:
        raise UserError(f"--prior-weight must be in [0, 1000], got {prior_weight}")
    if text_encoder_lr is not None and not text_encoder:
        raise UserError("--text-encoder-lr goes with --text-encoder")
    if pivotal is not None and trigger is not None:
        raise UserError("--pivotal: its --token is the trigger; give --token instead of --trigger")
    unet, base_diffusion, base_config, base_path = load_base(base)
    diffusion = adapter_diffusion(base_diffusion, objective)
    te, tokenizer = load_text_parts(base_path, base_config)
    fingerprint = prompt_fingerprint(unet, te)  # of the base alone, before a pivotal token exists
    token_param = None
    if pivotal is not None:  # the token's vectors, checked before anything is written
        token_param = add_token(te, tokenizer, check_placeholder(pivotal["token"]), init_vectors(
            te, tokenizer, pivotal.get("num_vectors", 1), pivotal.get("init_word")))
        trigger = pivotal["token"]
    elif trigger is not None:
        trigger = check_trigger_in(trigger, tokenizer)  # before anything is written
    captioned = captioned_data(style, data, per_digit, trigger, tokenizer)  # before anything is written
    if caption_dropout is not None:
        overrides["label_dropout"] = caption_dropout  # the mask TriggerTask draws replaces captions by ""
    cfg, out, device = prepare_run(
        default_trigger_train_config(trigger), out, resume, device, overwrite=overwrite,
        allow_changes=allow_changes,
        **overrides,
    )
    heldout = heldout_style(style, data) if cfg.validate_every else None  # before any work: may refuse
    te_lr = cfg.lr if text_encoder_lr is None else float(text_encoder_lr)
    # the token's vectors (pivotal): their own rate if given, else the text encoder's (they feed it)
    emb_lr = None if pivotal is None else float(pivotal["lr"]) if pivotal.get("lr") is not None else \
        te_lr if text_encoder else cfg.lr
    model = TextConditionedUNet(unet, te)
    for p in model.parameters():  # the whole base is frozen, the text encoder included
        p.requires_grad_(False)
    styled = load_style_data(style, data=data, per_digit=per_digit, seed=cfg.seed) if captioned is None else \
        as_digits(captioned, need_labels=False)
    vae = load_attached_vae(base_path, base_config)
    if vae is None:
        raise UserError(f"{base_path}: a prompt model without its VAE")
    images = cached_latents(vae, styled.images) if captioned is None else \
        cached_latents(vae, captioned.images)[captioned.expanded()]  # one latent per file, as kohya caches
    prior_images = prior_labels = None
    prior_source = None
    if prior:  # the plain training digits of the base (the class prior of DreamBooth, here real images)
        plain = load_mnist(data).train
        prior_images, prior_labels, prior_source = cached_latents(vae, plain.images), plain.labels, plain
    base_name = _base_name(base, base_path)
    run_info = {**style_run_info(base_name, fingerprint, style, styled, per_digit, False, diffusion),
                "trigger": trigger, "prior": prior, "prior_weight": prior_weight,
                "text_encoder": text_encoder, "text_encoder_lr": te_lr if text_encoder else None,
                "lora": lora.record()}  # fmt: skip
    if captioned is not None:  # the captions are data too: --resume notices an edited caption file
        joined = "\n".join(captioned.captions).encode()
        run_info["captions_fingerprint"] = hashlib.sha256(joined).hexdigest()[:16]
    if pivotal is not None:
        run_info["pivotal"] = {"token": trigger, "num_vectors": int(token_param.shape[0]),
                               "init_word": pivotal.get("init_word") or "", "lr": emb_lr}
    if prior_source is not None:
        run_info["prior_data_fingerprint"] = data_fingerprint(prior_source.images, prior_source.labels)
    torch.manual_seed(cfg.seed)  # LoRA init: the UNet's, then the text encoder's
    lora.inject(unet, lora.targets)
    if text_encoder:
        lora.inject(te, TE_TARGETS)
    trainable = adapter_parameter_names(model, "default")
    for key, p in model.named_parameters():  # inject_lora froze the other part's adapter: thaw both
        p.requires_grad_(key in trainable or p is token_param)
    s = lora_summary(model, "default")
    summary = {"trainable_params": s["lora_params"], "share": s["share"], "modules": s["modules"]}
    if token_param is not None:
        summary["trainable_params"] += token_param.numel()
        summary["embedding_params"] = token_param.numel()
    log.info("LoRA on a prompt base: %d trainable parameters (%.2f%% of the base)%s", s["lora_params"],
             100 * s["share"], ", text encoder included" if text_encoder else "")
    schedule = NoiseSchedule(diffusion)
    model.train()
    preview_words = [trigger] if trigger else []

    def export(m: nn.Module, directory: Path, step: int) -> None:
        adapter = adapter_from_prompt_model(m, fingerprint)
        if token_param is not None:
            adapter.embeddings = {trigger: m.text_encoder.added_tokens.vector(trigger).detach()}
        meta = {**adapter_meta(style, step, base_name, styled, cfg, lora, diffusion),
                TRIGGER_KEY: preview_words, "text_encoder": text_encoder,
                "text_encoder_targets": TE_TARGETS if text_encoder else None,
                "text_encoder_lr": te_lr if text_encoder else None, "prior": prior,
                "prior_weight": prior_weight if prior else None, "conditioning": "text",
                **({"embedding_lr": emb_lr} if emb_lr is not None else {})}  # fmt: skip
        adapter.extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        adapter.save(directory)

    preview = [f"the digit {trigger + ' ' if trigger else ''}{d}" for d in range(10)]
    plus = lora.lr_scale()
    validation = None
    if heldout is not None:  # held-out styled digits, captioned as in training (trigger included)
        x0, labels = heldout_inputs(heldout, unet.cfg.image_size, vae)
        validation = DiffusionValidation(schedule, x0, caption_ids(tokenizer, labels, trigger))
    token_key = next((k for k, p in model.named_parameters() if p is token_param), None)  # pivotal

    def lr_scale(k: str) -> float:
        if k == token_key:
            return emb_lr / cfg.lr
        return (te_lr / cfg.lr if k.startswith("text_encoder.") else 1.0) * plus(k)

    scores = None
    if cfg.score_every:  # with and without the trigger, against the base (adapters off) on plain prompts
        scores = style_lora_scores(prompt_drawer(schedule, tokenizer, vae), cfg.validation_images,
                                   prompts=True, trigger=trigger)
        scores.prime(model)
    if captioned is None:
        task, labels = TriggerTask(schedule, tokenizer, trigger, prior_images, prior_labels, prior_weight), \
            styled.labels
    else:
        captions = [captioned.captions[i] for i in captioned.expanded()]
        task = CaptionTask(schedule, tokenizer, captions, trigger, prior_images, prior_labels, prior_weight)
        labels = task.rows
    return fit_adapter(
        model, task, images, labels, cfg, out, export,
        preview=lambda m, p: preview_prompts(m, tokenizer, schedule, vae, p, prompts=preview),
        run_info=run_info, summary=summary, device=device, compile=compile, should_stop=should_stop,
        resume=resume, allow_changes=allow_changes, progress=progress,
        lr_scale=lr_scale if text_encoder or lora.loraplus_lr_ratio != 1.0 or pivotal is not None else None,
        validation=validation, scores=scores,
    )


class TriggerTask:
    """The Trainer's task for LoRA on a prompt model (see training.loop.DiffusionTask for the contract).

    Batch of step s (``trainer.batch_indices(s)``, B styled digits): exactly what a plain prompt-LoRA step
    draws, from the step's generator, in this order: t, eps, caption-dropout mask, then one caption per
    digit with the trigger (or none). With ``prior`` the same generator then draws B more rows: B plain
    digits uniformly from the prior pool (with replacement), their t, eps, dropout mask and trigger-less
    captions. So a step sees 2B rows (B styled + B prior, as diffusers' train_dreambooth_lora.py with
    --with_prior_preservation), its styled half is bit-identical to the run without --prior, and
        loss = mean over the styled rows + prior_weight * mean over the prior rows     (DreamBooth eq. 2).
    Each half is split over the ranks as PromptTask splits its batch.
    """

    def __init__(self, schedule, tokenizer, trigger: str | None, prior_images: torch.Tensor | None = None,
                 prior_labels: torch.Tensor | None = None, prior_weight: float = 1.0):
        self.schedule, self.trigger = schedule, trigger
        self.prior = prior_images is not None
        self.prior_images, self.prior_labels = prior_images, prior_labels
        self.prior_weight = float(prior_weight)
        texts = {EMPTY_PROMPT}
        for d in range(10):
            texts.update(all_captions(d, trigger))
            if self.prior:
                texts.update(all_captions(d))
        texts = sorted(texts)
        self.row = {c: i for i, c in enumerate(texts)}
        self.ids = tokenizer.encode(texts)
        self._on: dict = {}

    def _captions(self, labels: torch.Tensor, g: torch.Generator, drop, trigger) -> torch.Tensor:
        texts = captions_for(labels.cpu(), g, trigger=trigger)
        if drop is not None:
            texts = [EMPTY_PROMPT if d else c for c, d in zip(texts, drop.tolist(), strict=True)]
        return torch.tensor([self.row[c] for c in texts])

    def _half(self, trainer, images, labels, idx, g, trigger):
        """One half of the batch: its (x0, ids, t, eps) rows for this rank."""
        n = idx.shape[0]
        shape = (n, *images.shape[1:])
        t, noise, drop = self.schedule.draw_training_inputs(shape, g, trainer.cfg.label_dropout)
        rows_all = self._captions(labels[idx], g, drop, trigger)
        rows = slice(trainer.rank * n // trainer.world, (trainer.rank + 1) * n // trainer.world)
        dev = trainer.device
        return (images[idx[rows].to(dev)], self._ids(dev)[rows_all[rows].to(dev)], t[rows].to(dev),
                noise[rows].to(dev))

    def _ids(self, dev) -> torch.Tensor:
        if dev not in self._on:
            self._on[dev] = self.ids.to(dev)
            if self.prior:
                self._on[("prior", dev)] = (self.prior_images.to(dev), self.prior_labels.to(dev))
        return self._on[dev]

    def loss(self, trainer, step: int) -> torch.Tensor:
        cfg, schedule, dev = trainer.cfg, self.schedule, trainer.device
        g = torch.Generator().manual_seed(seed_value(cfg.seed * 1_000_003 + step))
        idx = trainer.batch_indices(step)
        x0, ids, t, noise = self._half(trainer, trainer.images, trainer.labels, idx, g, self.trigger)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=trainer.use_bf16):
            if not self.prior:
                return schedule.loss(trainer.net(), x0, ids, t, noise, None)
            self._ids(dev)
            p_images, p_labels = self._on[("prior", dev)]
            pidx = torch.randint(0, p_images.shape[0], (idx.shape[0],), generator=g)
            px0, pids, pt, pnoise = self._half(trainer, p_images, p_labels, pidx, g, None)
            k = x0.shape[0]
            x0, ids, t, noise = (torch.cat(p) for p in ((x0, px0), (ids, pids), (t, pt), (noise, pnoise)))
            per_row = schedule.row_losses(trainer.net(), x0, ids, t, noise)
            return per_row[:k].mean() + self.prior_weight * per_row[k:].mean()


OWN_CAPTIONS = "<own captions>"  # CaptionTask's styled half: each image's caption, not a template's


class CaptionTask(TriggerTask):
    """TriggerTask over a captioned folder (datasets.py): each image keeps its own caption (kohya's .txt /
    .caption files, diffusers' metadata.jsonl text) instead of one drawn from the templates. The Trainer's
    ``labels`` are each training row's index in the caption table (``rows``); caption dropout (the empty
    prompt) and prior preservation (template captions of plain digits) are TriggerTask's."""

    def __init__(self, schedule, tokenizer, captions: list[str], trigger: str | None,
                 prior_images: torch.Tensor | None = None, prior_labels: torch.Tensor | None = None,
                 prior_weight: float = 1.0):
        super().__init__(schedule, tokenizer, trigger, prior_images, prior_labels, prior_weight)
        new = sorted(set(captions) - set(self.row))
        if new:
            self.row.update({c: len(self.row) + i for i, c in enumerate(new)})
            self.ids = torch.cat([self.ids, tokenizer.encode(new)])
        self.rows = torch.tensor([self.row[c] for c in captions], dtype=torch.int64)
        self.trigger = OWN_CAPTIONS

    def _captions(self, labels: torch.Tensor, g: torch.Generator, drop, trigger) -> torch.Tensor:
        if trigger != OWN_CAPTIONS:  # the prior half: template captions without a trigger
            return super()._captions(labels, g, drop, trigger)
        rows = labels.cpu()
        return rows if drop is None else torch.where(drop.cpu(), self.row[EMPTY_PROMPT], rows)
