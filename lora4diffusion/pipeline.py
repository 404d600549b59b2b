"""Sampling API: a loaded model plus its noise schedule, turning digit labels (label models) or prompts
(prompt models: a text encoder reads the prompt) into images."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora4diffusion.captions import digit_prompts, negative_prompts
from lora4diffusion.catalog import embedding_folders, named_embeddings, pretrained_dir, resolve_checkpoint
from lora4diffusion.checkpoint import path_kind
from lora4diffusion.diffusion import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    STEPS_OFFSET,
    DDIMSampler,
    DDPMSampler,
    DiffusionConfig,
    NoiseSchedule,
    sample,
)
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model
from lora4diffusion.folders.text import load_text_parts
from lora4diffusion.folders.vae import load_attached_vae
from lora4diffusion.formats import read_any
from lora4diffusion.formats.embeddings import read_any_embedding
from lora4diffusion.latents import decode_latents
from lora4diffusion.limits import lora_weight
from lora4diffusion.lora.adapters import base_fingerprint, load_adapter, resolve_adapter, shipped_adapters
from lora4diffusion.lora.block_weights import AdapterWeight, from_diffusers, from_lbw, uniform
from lora4diffusion.lora.embeddings import load_embedding
from lora4diffusion.lora.layers import (
    adapter_names,
    delete_adapter,
    lora_layers,
    merged_while,
    row_multipliers_while,
)
from lora4diffusion.lora.prompt_lora import (
    load_prompt_adapter,
    missing_triggers,
    prompt_fingerprint,
    set_prompt_adapter_weight,
    trigger_words,
)
from lora4diffusion.models.unet import UNet
from lora4diffusion.pipeline_diffusers import DiffusersMixin
from lora4diffusion.prompt_syntax import TagWeight, has_tags, parse_prompt, prompt_loras

# Digits per sampling batch (x2 rows with guidance), the fastest measured on 2 cores, bf16 (benchmarks/
# RESULTS.md): the pixel model at 50 (100 rows keep every 28x28 activation under glibc's 32 MiB mmap ceiling;
# 250 was slower); a latent model's 8x8 activations are 12x smaller and 250 ran ~1.2x faster than 50.
PIXEL_BATCH = 50
LATENT_BATCH = 250


@dataclass
class Pipeline(DiffusersMixin):  # + diffusers' names: __call__, load_lora_weights, set_adapters, ...
    unet: UNet
    diffusion: DiffusionConfig
    config: dict
    vae: object = None  # models.vae.VAE for a latent model (trained with --vae), None for a pixel model
    text_encoder: object = None  # models.text_encoder.TextEncoder of a prompt model, None for a label model
    tokenizer: object = None  # models.tokenizer.Tokenizer of a prompt model
    # adapter name -> its trigger words (prompt models; lora/prompt_lora.py), for the missing-trigger warning
    triggers: dict = field(default_factory=dict)
    # <lora:KEY:W> tags seen so far: KEY -> adapter name (loaded once; weights are set per call)
    tag_adapters: dict = field(default_factory=dict)
    # adapters loaded by add_lora (--lora), not by tags: their resolved file -> adapter name
    added: dict = field(default_factory=dict)
    # textual-inversion tokens loaded by add_embedding (--embedding): token -> the file or name given
    embeddings: dict = field(default_factory=dict)
    # adapter name -> its AdapterWeight (text encoder, UNet, blocks) as last set (lora/block_weights.py)
    weights: dict = field(default_factory=dict)
    # where a prompt's unknown token <name> finds its embedding by name (load_prompt_embeddings)
    embedding_dirs: list = field(default_factory=embedding_folders)
    # the current call's per-prompt adapter weights when its prompts carry different tags (apply_prompt_tags)
    row_weights: list | None = None

    @property
    def is_prompt_model(self) -> bool:
        return self.text_encoder is not None

    @property
    def text(self) -> tuple | None:
        """(text encoder, tokenizer) of a prompt model (what folders.model.save_model takes), else None."""
        return (self.text_encoder, self.tokenizer) if self.is_prompt_model else None

    @classmethod
    def load(cls, checkpoint: str | Path | None = None) -> Pipeline:
        """Load a model directory or a shipped model's name (``base``, ``pixel-base``); None means the base
        model shipped with the package (the prompt-conditioned latent ``base``)."""
        if checkpoint is None:
            checkpoint = pretrained_dir()
            if not (checkpoint / "config.json").is_file():
                raise UserError(
                    "no shipped base model in this install; pass --checkpoint DIR (train one first)"
                )
        checkpoint = resolve_checkpoint(checkpoint)
        unet, diffusion, config = load_model(Path(checkpoint))
        vae = load_attached_vae(checkpoint, config)  # None for a pixel model
        if vae is None and unet.cfg.in_channels != 1:
            raise UserError(f"{checkpoint}: a latent model ({unet.cfg.in_channels} channels) without its VAE")
        if unet.cfg.conditioning == "text":
            text_encoder, tokenizer = load_text_parts(checkpoint, config)
            return cls(unet, diffusion, config, vae, text_encoder, tokenizer)
        return cls(unet, diffusion, config, vae)

    def add_lora(self, path: str | Path, weight: float | AdapterWeight = 1.0, force: bool = False) -> str:
        """Load an adapter (ours, PEFT's, diffusers' or kohya's layout: detected) into the UNet at ``weight``
        (a number, or an AdapterWeight: text encoder, UNet, blocks); returns its name. Each weight lies
        within limits.MAX_LORA_WEIGHT (as every way a weight arrives)."""
        name = self._load(path, weight, force)
        if isinstance(path, str | Path):
            self.added[self._source(path)] = name
        return name

    def add_embedding(self, path: str | Path, force: bool = False, token: str | None = None) -> str:
        """Load a textual-inversion embedding (ours, diffusers' or A1111's file, detected; or an embedding's
        name, catalog.named_embeddings): its token (``token`` renames it) then works in every prompt. Returns
        the token. One trained on another base is refused unless ``force``."""
        if not self.is_prompt_model:
            raise UserError(f"--embedding {path}: a label model has no text encoder (embeddings go into a"
                            " prompt model's)")
        emb = read_any_embedding(path, token)
        token = load_embedding(self.text_encoder, self.tokenizer, emb, self.fingerprint, str(path), force)
        self.embeddings[token] = str(path)
        return token

    def load_prompt_embeddings(self, prompts: list[str], force: bool = False) -> list[str]:
        """Load the embeddings the prompts' unknown tokens name, found in ``embedding_dirs`` (./embeddings and
        the shipped ones): as AUTOMATIC1111, a prompt word that is an embedding's name brings it, here the
        token <name> for NAME.safetensors or a folder NAME. Returns the tokens loaded; a token found nowhere
        is a UserError naming the nearest tokens known (loaded, or in those folders)."""
        if not self.is_prompt_model:
            return []
        wanted = self.tokenizer.unknown_tokens([p for p in prompts if isinstance(p, str)])
        if not wanted:
            return []
        found = {name.lower(): p for name, p in reversed(named_embeddings(self.embedding_dirs).items())}
        missing = [t for t in wanted if t[1:-1] not in found]
        if missing:
            known = [*self.tokenizer.added, *(f"<{n}>" for n in found)]
            near = difflib.get_close_matches(missing[0], known, n=3, cutoff=0.5)
            hint = f"nearest: {', '.join(near)}" if near else "no known token is close"
            raise UserError(f"unknown token {missing[0]!r} in the prompt: no embedding of that name is"
                            f" loaded, nor in an embeddings/ folder ({hint}; load its file with --embedding,"
                            f" or put it in ./embeddings as {missing[0][1:-1]}.safetensors)")
        return [self.add_embedding(found[t[1:-1]], force, token=t) for t in wanted]

    def _load(self, path: str | Path, weight: float | AdapterWeight, force: bool) -> str:
        steer = weight if isinstance(weight, AdapterWeight) else None
        weight = lora_weight(weight.unet if steer else weight, f"adapter {path}")
        if self.is_prompt_model:  # UNet and text-encoder modules, one fingerprint over both
            name, adapter = load_prompt_adapter(self.unet, self.text_encoder, path, weight, force, read_any,
                                                tokenizer=self.tokenizer)
            self.triggers[name] = trigger_words(adapter)
        else:
            name = load_adapter(self.unet, path, weight=weight, force=force, reader=read_any)
        self.weights[name] = uniform(weight)
        if steer is not None:
            self.set_lora_weight(name, steer)
        return name

    @staticmethod
    def _source(path: str | Path) -> Path:
        """The file an adapter argument names (a path, or a shipped adapter's name), for telling whether a tag
        and --lora name the same adapter."""
        return resolve_adapter(path).resolve()

    def set_lora_weight(self, name: str, weight: float | dict | AdapterWeight) -> None:
        """Change a loaded adapter's weight (the name add_lora returned); 0 gives the base's images.

        ``weight``: one number for the whole adapter; or, as diffusers' ``set_adapters`` takes it, a dict
        ``{"text_encoder": a, "unet": u}`` with u a number or ``{"down": b, "mid": c, "up": d}`` (b and d a
        number or ``{"block_1": x}`` / ``{"block_1": [x0, x1]}``; a part not named is 1); or an
        ``AdapterWeight`` (lora/block_weights.py: also A1111's TE/UNet and LoRA Block Weight lists). Each
        resulting multiplier lies within limits.MAX_LORA_WEIGHT."""
        if isinstance(weight, dict):
            weight = from_diffusers(weight, self.unet.cfg)
        elif not isinstance(weight, AdapterWeight):
            weight = uniform(weight, f"adapter {name!r}")
        set_prompt_adapter_weight(self.unet, self.text_encoder, name, weight)
        self.weights[name] = weight

    def lora_weight(self, name: str) -> AdapterWeight:
        """Adapter ``name``'s weight as last set (text encoder, UNet, blocks)."""
        if name not in self.weights:
            return uniform(self._weight(name) or 0.0)
        return self.weights[name]

    def _steering(self, value: float | TagWeight) -> float | AdapterWeight:
        """A tag's weight -> what ``set_lora_weight`` takes (a TagWeight's lbw= list is read on this UNet)."""
        if not isinstance(value, TagWeight):
            return value
        if value.lbw is None:
            return AdapterWeight(value.te, value.unet)
        return from_lbw(value.te, value.unet, value.lbw, self.unet.cfg)

    def remove_lora(self, name: str) -> None:
        """Unload adapter ``name`` (from the text encoder too); once every adapter is removed the model is the
        plain base again."""
        found = False
        for part in (self.unet, self.text_encoder):
            if part is not None and name in adapter_names(part):
                delete_adapter(part, name)
                found = True
        if not found:
            delete_adapter(self.unet, name)  # raises the one-line "no adapter named ..." error
        self.tag_adapters = {k: v for k, v in self.tag_adapters.items() if v != name}
        self.added = {k: v for k, v in self.added.items() if v != name}
        self.triggers.pop(name, None)
        self.weights.pop(name, None)

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their (UNet) weights, by name; ``lora_weights``: every part's."""
        return {n: self.lora_weight(n).unet for n in adapter_names(self.unet)}

    @property
    def lora_weights(self) -> dict[str, AdapterWeight]:
        """The loaded adapters and their weights: text encoder, UNet and blocks (lora/block_weights.py)."""
        names = dict.fromkeys([*adapter_names(self.unet), *(adapter_names(self.text_encoder)
                                                          if self.text_encoder is not None else [])])
        return {n: self.lora_weight(n) for n in names}

    def apply_prompt_tags(self, prompts: list[str], force: bool = False) -> list[str]:
        """Resolve the ``<lora:NAME_OR_PATH[:WEIGHT]>`` tags of one call (prompt_syntax.prompt_loras): each
        adapter is loaded once (a path, else a shipped adapter's name); adapters that earlier calls' tags
        loaded and this call's tags do not name are set to weight 0. Returns the prompts without their tags.
        When every prompt carries the same tags, the adapters are set to the call's weights. Otherwise each
        row gets its own (peft's ``adapter_names=``): the tagged adapters' weights are set to 0 and
        ``row_weights`` holds each prompt's {adapter: AdapterWeight}, which ``generate`` applies row by row.
        A tag naming an adapter that ``add_lora`` (--lora) loaded is not applied a second time: that adapter
        acts on every row at its one weight, and a tag giving it another weight is refused (as the web API
        refuses a tag and a ``loras`` entry that disagree)."""
        if not self.is_prompt_model:
            raise UserError("<lora:...> tags go in prompts of a prompt model; a label model takes --lora")
        self.row_weights = None
        stripped, tagged = prompt_loras(list(prompts), paths=True)
        rows = [{key: self._steering(value) for key, value in row.items()} for row in tagged]  # lbw= here
        keys = list(dict.fromkeys(key for row in rows for key in row))
        shipped = shipped_adapters()
        for key in keys:  # every name resolved before any adapter is loaded
            if key not in self.tag_adapters and path_kind(Path(key)) == "missing" and key not in shipped:
                known = sorted({*shipped, *self.tag_adapters})
                near = difflib.get_close_matches(key, known, n=3, cutoff=0.4)
                hint = f"nearest: {', '.join(near)}" if near else f"known: {', '.join(known) or 'none'}"
                raise UserError(f"<lora:{key}>: no adapter of that name or path ({hint})")
        for key in keys:
            name = None if key in self.tag_adapters else self.added.get(self._source(key))
            if name is None:
                continue
            have = self.lora_weight(name)  # loaded by --lora (add_lora): one adapter, one weight
            for row in rows:
                want = self._as_weight(row.pop(key, have))
                if (have.text_encoder, have.unet, have.blocks) != (want.text_encoder, want.unet, want.blocks):
                    raise UserError(f"adapter {name!r}: the prompt's tag <lora:{key}:{want}> says"
                                    f" {want}, --lora (add_lora) says {have}; give its weight in one place")
        for key in dict.fromkeys(key for row in rows for key in row):
            if key not in self.tag_adapters:
                self.tag_adapters[key] = self._load(key, next(row[key] for row in rows if key in row), force)
        mixed = any(row != rows[0] for row in rows)
        for key, name in self.tag_adapters.items():
            self.set_lora_weight(name, rows[0].get(key, 0.0) if rows and not mixed else 0.0)
        if mixed:
            self.row_weights = [{self.tag_adapters[key]: self._as_weight(w) for key, w in row.items()}
                                for row in rows]
        return stripped

    def _row_adapters(self, start: int, stop: int) -> contextlib.AbstractContextManager:
        """While sampling rows [start, stop) of a call whose prompts carry different tags: each adapter layer
        scales its adapters row by row (``lora.layers.row_multipliers_while``); the text encoder's rows and
        the unconditional half of guidance's doubled batch take their prompt's adapters."""
        if self.row_weights is None:
            return contextlib.nullcontext()
        rows = self.row_weights[start:stop]
        names = {name for row in self.row_weights for name in row}

        def weight_of(model, path: str, name: str) -> list[float] | None:
            if name not in names:
                return None
            te = model is self.text_encoder
            weights = [row[name].module(path, text_encoder=te) if name in row else 0.0 for row in rows]
            return weights if any(weights) else None  # none of these rows: its weight, 0, skips it

        return row_multipliers_while((self.unet, self.text_encoder), weight_of)

    def _weight(self, name: str) -> float | None:
        for part in (self.unet, self.text_encoder):
            for layer in lora_layers(part).values() if part is not None else ():
                if name in layer.multipliers:
                    return layer.multipliers[name]
        return None

    def missing_triggers(self, prompts: list[str]) -> list[tuple[str, str]]:
        """(adapter, prompt) for loaded adapters (weight != 0 not checked) whose trigger words a prompt
        (without its tags) lacks: the adapter then acts weakly or, with prior preservation, not at all."""
        active = {n: w for n, w in self.triggers.items() if n not in self._muted()}
        texts = [parse_prompt(p, paths=True).text for p in prompts]
        rows = self.row_weights
        if rows is None or len(rows) != len(texts):
            return missing_triggers(active, texts)
        return [hit for row, text in zip(rows, texts, strict=True)  # rows with their own adapters
                for hit in missing_triggers({**active, **{n: self.triggers.get(n, []) for n, w in row.items()
                                                          if w.scalar != 0.0}}, [text])]

    def _muted(self) -> set[str]:
        return {n for n, w in self.lora_weights.items() if w.scalar == 0.0}

    @staticmethod
    def _as_weight(weight: float | AdapterWeight) -> AdapterWeight:
        return weight if isinstance(weight, AdapterWeight) else uniform(weight)

    def to(self, device: str | torch.device) -> Pipeline:
        """Move the UNet (adapters included) to ``device``: auto | cpu | cuda or a torch.device."""
        self.unet.to(resolve_device(device))
        for part in (self.vae, self.text_encoder):
            if part is not None:
                part.to(resolve_device(device))
        return self

    @property
    def fingerprint(self) -> str:
        """The base fingerprint adapters record: the UNet's, and for a prompt model the text encoder's too."""
        if self.text_encoder is None:
            return base_fingerprint(self.unet)
        return prompt_fingerprint(self.unet, self.text_encoder)

    def module_names(self) -> set[str]:
        """Names an adapter may target: the UNet's modules, and ``text_encoder.``-prefixed ones."""
        names = {n for n, _ in self.unet.named_modules()}
        if self.text_encoder is not None:
            names |= {f"text_encoder.{n}" for n, _ in self.text_encoder.named_modules()}
        return names

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def batch_size(self) -> int:
        """Digits per sampling batch by default: the fastest measured for this kind of model."""
        return PIXEL_BATCH if self.vae is None else LATENT_BATCH

    @property
    def image_size(self) -> int:
        return self.unet.cfg.image_size

    def sampler(self, kind: str = "ddim", steps: int | None = DEFAULT_STEPS, eta: float = 0.0):
        schedule = NoiseSchedule(self.diffusion)
        clip = self.vae is None  # pixels live in [-1, 1]; latents have no such range (SD does not clip them)
        # prompt models sample as StableDiffusionPipeline does (timesteps shifted by SD's steps_offset 1), so
        # their diffusers export gives the same images (diffusion.STEPS_OFFSET)
        offset = STEPS_OFFSET if self.is_prompt_model else 0
        if kind == "ddim":
            s = DDIMSampler(schedule, eta=eta, clip_sample=clip, steps_offset=offset)
        elif kind == "ddpm":
            if isinstance(eta, bool) or not isinstance(eta, int | float) or eta != 0:  # not silently dropped
                raise UserError(f"eta {eta!r:.40} applies to the ddim sampler; ddpm always draws DDPM's own"
                                " variance (ddim's eta 1)")
            s = DDPMSampler(schedule, clip_sample=clip, steps_offset=offset)
        else:
            raise UserError(f"unknown sampler {kind!r} (choose ddim or ddpm)")
        s.set_timesteps(steps)
        return s

    @torch.no_grad()
    def generate(
        self,
        labels: list[int] | list[str] | torch.Tensor,
        sampler: str = "ddim",
        steps: int | None = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        eta: float = 0.0,
        batch_size: int | None = None,
        trajectory_every: int = 0,
        bf16: bool = False,
        progress: bool = False,
        callback: Callable[[int, int, int, torch.Tensor], None] | None = None,
        negative: str | list[str] | None = None,
        merged: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample one image per label; returns (images [N, H, W] in [0, 1], trajectory of every image).

        The same seed gives the same images bit for bit (on one device). Batches are seeded (seed, batch
        index), so the result does not depend on how many other digits are asked for in later batches. Noise
        is drawn by a CPU generator on every device, so a GPU run starts from the same x_T as a CPU run.
        ``batch_size`` (None: ``self.batch_size``, 50 for a pixel model, 250 for a latent one) is part of
        the seeding, so the same seed at another batch size gives other (equally good) images. Raise it on a
        GPU.
        Non-finite results (an overflowing model, adapter or guidance) raise UserError instead of returning.
        ``callback(first_index, step, steps, x0_hat)``: after every step of every batch, the predicted clean
        images of the batch starting at ``first_index`` ([b, C, H, W] in [-1, 1]; latents for latent models);
        for live previews. The trajectory (``trajectory_every`` > 0) is a list of frames [N, 1, H, W] in
        [-1, 1], one row per label: ``[x[::k] for x in trajectory]`` shows every k-th sample's denoising.

        Prompt models: ``labels`` are prompts (strings), or digits, which become prompts of the "digit"
        family (captions.digit_prompts). ``negative`` (one string, or one per prompt) replaces the empty
        prompt as the unconditional branch of guidance. A bad prompt raises UserError before any sampling.
        Prompts may carry ``<lora:NAME_OR_PATH[:WEIGHT]>`` tags: see ``apply_prompt_tags``.
        ``merged``: sample with the adapters folded into the weights (each step then costs the base's), and
        put the weights back exactly afterwards (``lora.layers.merged_while``). Opt-in: the images differ
        from unmerged sampling by rounding (fp32: ~1e-5 on a pixel; bf16: visibly, up to 0.46, as W0 + m ΔW
        is rounded to bf16), so the default keeps the images every earlier record and command promise.
        """
        device = self.device
        contexts = None
        self.row_weights = None  # set by this call's tags (apply_prompt_tags) when its rows differ
        if self.is_prompt_model:
            contexts = self._contexts(labels, negative)
            labels = torch.zeros(len(contexts[0]), dtype=torch.int64, device=device)  # only its length counts
        else:
            if negative is not None or any(isinstance(v, str) for v in labels):
                raise UserError("this is a label model: it takes digits, not prompts (use --digits)")
            labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        s = self.sampler(sampler, steps, eta)
        batch_size = batch_size or self.batch_size
        self.unet.eval()
        shape = (self.unet.cfg.in_channels, self.image_size, self.image_size)
        out, traj = [], []
        folded = merged_while((self.unet, self.text_encoder)) if merged else contextlib.nullcontext()
        with folded:  # the weights do not change during a call: fold the adapters in once (opt-in)
            for b, start in enumerate(range(0, len(labels), batch_size)):
                g = torch.Generator().manual_seed((seed * 1_000_003 + b) % 2**64)  # manual_seed takes 64 bits
                rows = self._row_adapters(start, start + batch_size)  # prompts with different tags
                with rows, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    cond, uncond = labels[start : start + batch_size], None
                    if contexts is not None:  # the text encoder runs once per batch, not once per step
                        ids, neg_ids = (c[start : start + batch_size].to(device) for c in contexts)
                        cond, uncond = self.text_encoder(ids)[0], self.text_encoder(neg_ids)[0]
                    x, t = sample(
                        self.unet,
                        s,
                        cond,
                        shape,
                        guidance,
                        g,
                        trajectory_every,
                        progress,
                        clip=self.vae is None,
                        uncond=uncond,
                        callback=None if callback is None else functools.partial(callback, start),
                    )
                if not torch.isfinite(x).all():  # clamp() below would hide inf as 0/1 and keep NaN: refuse
                    raise UserError(
                        f"sampling produced non-finite values (NaN/inf) at guidance {guidance:g}: the"
                        " model or an adapter overflows; lower --guidance or the --lora scales (nothing was"
                        " written)"
                    )
                out.append(x.float().cpu())
                traj.append(t)
        traj = [torch.cat(frames) for frames in zip(*traj, strict=True)] if trajectory_every else []
        if self.vae is not None:  # latent diffusion: the decoder turns the sampled latents into digits
            images = torch.cat([decode_latents(self.vae, x, bf16=bf16) for x in out])
            # the denoising strip shows decoded latents: plots expect [B, 1, H, W] in [-1, 1]
            return images, [decode_latents(self.vae, x, bf16=bf16)[:, None] * 2 - 1 for x in traj]
        images = ((torch.cat(out) + 1) / 2).clamp(0, 1)[:, 0]
        return images, traj

    def _contexts(self, prompts, negative) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the prompts and of their unconditional branch (a bad word is a UserError)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if all(isinstance(p, str) for p in prompts):
            if self.tag_adapters or any(has_tags(p) for p in prompts):
                prompts = self.apply_prompt_tags(prompts)  # <lora:...> loads/weights adapters, then goes
            self.load_prompt_embeddings([*prompts, *negative_prompts(negative, len(prompts))])
        if not all(isinstance(p, str) for p in prompts):
            if any(isinstance(p, str) for p in prompts):
                raise UserError("give prompts (strings) or digits, not a mix")
            prompts = digit_prompts(prompts)
        if not prompts:
            raise UserError("no prompts to sample")
        return self.tokenizer.encode(prompts), self.tokenizer.encode(negative_prompts(negative, len(prompts)))
