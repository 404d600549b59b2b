"""The diffusers-shaped face of ``Pipeline``: ``StableDiffusionPipeline.__call__`` and its LoRA loader's
methods (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...) with diffusers' argument names and
meanings, on our own model, returning our images. ``Pipeline`` (pipeline.py) inherits this mixin and keeps
its own names (``generate``, ``add_lora``, ...); docs/API.md, "Python: ours and diffusers' names", puts both
side by side.

What diffusers 0.42 does, and this does the same (tests/test_pipeline_diffusers.py checks it against the real
``StableDiffusionPipeline`` loading our export):
- ``__call__``: guidance eps_u + w (eps_c - eps_u) with the negative prompt (or "") as eps_u, only when
  ``guidance_scale > 1``; at w <= 1 the conditional prediction alone (``generate`` mixes the two at any w, so
  the two differ below 1). Initial latents: ``randn(shape, generator)`` drawn on the generator's device, one
  draw for the batch (one per image for a list of generators), shape (prompts x num_images_per_prompt, C, h,
  w), times the DDIM scheduler's init_noise_sigma (1); each prompt's images are consecutive. DDIM with eta > 0
  draws its step noise from the same generator afterwards.
- loading an adapter makes it the only active one; ``set_adapters`` activates the names given (weights, else
  1) and deactivates every other adapter (kept loaded, its weight remembered); deleting the last active
  adapter activates the alphabetically first one left (PEFT's choice, at its remembered weight);
  ``fuse_lora(lora_scale=s)`` multiplies the fused adapters' weights by s, and ``unfuse_lora`` keeps them
  multiplied; ``unload_lora_weights`` after ``fuse_lora`` keeps the fused weights in the model; an adapter
  loaded while LoRA is disabled is disabled too.

Where ours differs (each also in docs/API.md):
- images are our 28 x 28 digits (a latent model's VAE canvas, 32 x 32 in the diffusers export, cropped to its
  centre); the latent shape (C, h, w) comes from our UNet (a prompt model's VAE latents, 4 x 8 x 8 for the
  shipped base; 1 x 28 x 28 pixels for a label model); label models take digits as the prompt and no negative;
- defaults are our model's (``DEFAULT_STEPS`` DDIM steps, guidance ``DEFAULT_GUIDANCE``), not SD's 50 / 7.5;
  the scheduler is always DDIM, in fp32 (``generate(bf16=True)`` is ours);
- bad input is a one-line ``UserError`` (a ValueError, as diffusers raises): an unknown adapter name for
  ``delete_adapters`` too (diffusers only warns); adapter weights lie within limits.MAX_LORA_WEIGHT;
- changing a fused adapter's weight (``set_adapters``, ``cross_attention_kwargs={"scale": s}``) fuses it
  again at the new weight; diffusers keeps the old fused weights, and its later unfuse subtracts the new
  ones. ``disable_lora`` unfuses first. A call's ``cross_attention_kwargs`` scale lasts that call (diffusers
  also applies it to the text-encoder part of adapters loaded later); ``fused_loras`` is empty after
  ``unload_lora_weights`` (diffusers still lists what was folded in).
- prompts may carry our ``<lora:NAME:W>`` tags (``Pipeline.apply_prompt_tags``), different ones per prompt
  (each row its own adapters, as peft's ``adapter_names=``; diffusers has no per-row adapters); a negative
  prompt given as one string applies to every prompt (diffusers wants a list as long as a list of prompts).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch
from PIL import Image

from lora4diffusion.data import from_model_range
from lora4diffusion.diffusion import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample
from lora4diffusion.errors import UserError
from lora4diffusion.formats import read_any
from lora4diffusion.latents import decode_latents
from lora4diffusion.limits import MAX_GUIDANCE
from lora4diffusion.lora.adapters import load_adapter
from lora4diffusion.lora.block_weights import AdapterWeight, checked, from_diffusers
from lora4diffusion.lora.layers import adapter_names as layer_adapters
from lora4diffusion.lora.layers import (
    enable_lora,
    lora_layers,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lora4diffusion.lora.prompt_lora import load_prompt_adapter, trigger_words

log = logging.getLogger("lora4diffusion")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COMPONENTS = ("unet", "text_encoder")  # StableDiffusionLoraLoaderMixin._lora_loadable_modules
STATE = "_diffusers_adapters"  # the AdapterState in a Pipeline's __dict__ (it is no dataclass field)


@dataclass
class PipelineOutput:
    """What ``StableDiffusionPipelineOutput`` holds. ``images``: a list of PIL grayscale ("L") images
    (output_type "pil"), float32 [N, 28, 28, 1] in [0, 1] ("np"), [N, 1, 28, 28] ("pt") or the sampled latents
    ("latent"). No safety checker runs: ``nsfw_content_detected`` is None, as in a pipeline without one."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None

    def to_tuple(self) -> tuple:
        return (self.images, self.nsfw_content_detected)

    def __getitem__(self, i: int) -> object:  # out[0] is the images, as diffusers' BaseOutput
        return self.to_tuple()[i]


@dataclass
class AdapterState:
    """What diffusers' adapter management remembers beyond our per-adapter weights: adapters switched off by
    ``set_adapters`` / ``load_lora_weights`` (weight 0 in the model) with the weight they had, the order of
    the active ones, and whether ``disable_lora`` is in force."""

    off: dict[str, float] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    disabled: bool = False


class DiffusersMixin:
    """diffusers' names on ``Pipeline`` (mixed into it: uses its unet, text encoder, adapters and sampler)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None) -> Self:
        """``Pipeline.load``: a model folder or a shipped model's name (None: the shipped base)."""
        return cls.load(pretrained_model_name_or_path)

    # ----- generation -----
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | int | list[str] | list[int] | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
    ) -> PipelineOutput | tuple:
        """Draw ``num_images_per_prompt`` images per prompt, as ``StableDiffusionPipeline.__call__`` does
        with a DDIM scheduler (module docstring). A label model takes digits (an int or a list) as
        ``prompt`` and no negative prompt; a prompt model takes strings, or digits as "the digit 7"-style
        prompts. ``latents``: the initial noise [N, C, h, w] (N = prompts x images per prompt), instead of a
        draw from ``generator``. ``cross_attention_kwargs={"scale": s}``: every active adapter at s times its
        weight for this call (diffusers' per-call LoRA scale). Returns ``PipelineOutput`` or, with
        ``return_dict=False``, the tuple (images, None). Arguments after ``prompt`` are keywords only (ours
        are a subset of diffusers', in another order)."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise UserError("num_images_per_prompt must be an integer >= 1, got"
                            f" {num_images_per_prompt!r:.40}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) \
                or not 0 <= guidance_scale <= MAX_GUIDANCE:
            raise UserError(f"guidance_scale must be a number in [0, {MAX_GUIDANCE:g}], got"
                            f" {guidance_scale!r:.40}")
        prompts = self._prompt_list(prompt)
        repeat = num_images_per_prompt
        # diffusers repeats each prompt's embedding num_images_per_prompt times: p0, p0, p1, p1, ...
        wanted = [p for p in prompts for _ in range(repeat)]
        device = self.device
        if self.is_prompt_model:
            negatives = negative_prompt
            if isinstance(negative_prompt, list | tuple):
                if len(negative_prompt) != len(prompts):
                    raise UserError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts:"
                                    " give one, or one per prompt")
                negatives = [n for n in negative_prompt for _ in range(repeat)]
            self.row_weights = None  # set by this call's tags when its prompts carry different ones
            ids, neg_ids = self._contexts(wanted, negatives)  # tags load and weigh adapters here
            cond = None
        else:
            if negative_prompt is not None or any(isinstance(p, str) for p in prompts):
                raise UserError("this is a label model: its prompt is digits (an int or a list of ints)"
                                " and it takes no negative_prompt")
            if not all(0 <= d <= 9 for d in prompts):
                raise UserError(f"a label model draws the digits 0-9, got {prompts!r:.60}")
            cond = torch.as_tensor(wanted, dtype=torch.int64).to(device)
        sampler = self.sampler("ddim", num_inference_steps, eta)
        shape = (self.unet.cfg.in_channels, self.image_size, self.image_size)
        n = len(wanted)
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, list) and eta > 0:
            raise UserError("a list of generators draws only the initial latents here; with eta > 0 pass one"
                            " torch.Generator")
        x_T = self._initial_latents((n, *shape), generator, latents, device)
        step_generator = generator if isinstance(generator, torch.Generator) else None
        # diffusers: no classifier-free guidance unless guidance_scale > 1 (the conditional prediction alone,
        # which is our w = 1: guided_eps runs the conditional model only)
        w = float(guidance_scale) if guidance_scale > 1 else 1.0
        restore = self._scale_active(cross_attention_kwargs)
        try:
            if self._adapter_state().disabled:  # adapters loaded since (add_lora, tags) are disabled too
                self._apply_enabled()
            uncond = None
            with self._row_adapters(0, n):  # each row its own adapters (prompts with different tags)
                if self.is_prompt_model:  # after the scale: diffusers scales the text encoder's LoRA too
                    cond, uncond = (self.text_encoder(ids.to(device))[0],
                                    self.text_encoder(neg_ids.to(device))[0])
                self.unet.eval()
                x, _ = sample(self.unet, sampler, cond, shape, w, step_generator, clip=self.vae is None,
                              uncond=uncond, x_T=x_T)
        finally:
            restore()
        if not torch.isfinite(x).all():
            raise UserError(f"sampling produced non-finite values (NaN/inf) at guidance_scale"
                            f" {guidance_scale:g}: the model or an adapter overflows; lower guidance_scale or"
                            " the adapter weights")
        images = self._output(x, output_type)
        return PipelineOutput(images) if return_dict else (images, None)

    @staticmethod
    def _prompt_list(prompt) -> list:
        if prompt is None:
            raise UserError("give a prompt: text (a prompt model) or digits (a label model)")
        items = list(prompt) if isinstance(prompt, list | tuple) else [prompt]
        if not items:
            raise UserError("no prompts to sample")
        for p in items:
            if isinstance(p, bool) or not isinstance(p, str | int):
                raise UserError(f"a prompt is a string or a digit, got {type(p).__name__}")
        return items

    @staticmethod
    def _initial_latents(shape: tuple[int, ...], generator, latents: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor:
        """diffusers' prepare_latents + randn_tensor: given latents as they are, else a draw on the
        generator's device (one per image for a list), times init_noise_sigma (1 for DDIM)."""
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UserError(f"latents must be a tensor of shape {shape} (prompts x images per prompt,"
                                f" then this model's latent channels and size), got {got}")
            return latents.to(device, torch.float32)
        if isinstance(generator, list):
            if len(generator) != shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
                raise UserError(f"a list of generators needs one torch.Generator per image ({shape[0]}), got"
                                f" {len(generator)} items")
            return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
                             ).to(device)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise UserError("generator must be a torch.Generator (torch.Generator().manual_seed(0)) or a list"
                            f" of them, got {type(generator).__name__}")
        rand_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=rand_device).to(device)

    def _output(self, x: torch.Tensor, output_type: str):
        if output_type == "latent":
            return x
        if self.vae is not None:
            images = decode_latents(self.vae, x)  # [N, 28, 28] in [0, 1]: the digit at the canvas's centre
        else:
            images = from_model_range(x)[:, 0].cpu()
        if output_type == "pt":
            return images[:, None]
        array = images[..., None].numpy()  # [N, H, W, 1] as diffusers' "np"
        if output_type == "np":
            return array
        return [Image.fromarray(a[..., 0]) for a in (array * 255).round().astype("uint8")]  # mode "L"

    def _scale_active(self, cross_attention_kwargs: dict | None):
        """Multiply every active adapter's weight by cross_attention_kwargs["scale"] (in both parts); returns
        the function that puts the weights back."""
        if cross_attention_kwargs is None:
            return lambda: None
        if not isinstance(cross_attention_kwargs, dict) or set(cross_attention_kwargs) - {"scale"}:
            raise UserError("cross_attention_kwargs: only {'scale': s} (the adapters' scale for this call) is"
                            " supported")
        scale = _finite(cross_attention_kwargs.get("scale", 1.0), "cross_attention_kwargs scale")
        before = {name: self.lora_weight(name) for name in self.get_active_adapters()}
        scaled = {name: checked(w.scaled(scale), f"adapter {name!r} at cross_attention_kwargs scale"
                                f" {scale:g}") for name, w in before.items()}  # all checked before any is set
        rows = self.row_weights  # prompts with different tags: each row's weights are scaled too
        scaled_rows = None if rows is None else [
            {name: checked(w.scaled(scale), f"adapter {name!r} at cross_attention_kwargs scale {scale:g}")
             for name, w in row.items()} for row in rows]
        for name, w in scaled.items():
            self.set_lora_weight(name, w)
        self.row_weights = scaled_rows

        def restore() -> None:
            for name, w in before.items():
                self.set_lora_weight(name, w)
            self.row_weights = rows

        return restore

    # ----- adapters (StableDiffusionLoraLoaderMixin) -----
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path,
                          adapter_name: str | None = None, weight_name: str | None = None) -> None:
        """Load an adapter file or folder (diffusers', kohya's, PEFT's or ours: detected), or a shipped
        adapter's name, into the UNet and, where it has such modules, the text encoder, as ``adapter_name``
        (None: ``default_<number of adapters loaded>``, as diffusers). It becomes the only active adapter,
        at weight 1 (``set_adapters`` to combine). ``weight_name``: the file inside the folder given."""
        src = pretrained_model_name_or_path_or_dict
        if not isinstance(src, str | Path):
            raise UserError("load_lora_weights: give a file, a folder or a shipped adapter's name (a state"
                            f" dict is not read here), got {type(src).__name__}")
        path = Path(src) / weight_name if weight_name is not None else src
        loaded = self._loaded()
        name = self._default_adapter_name() if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name or "." in name:
            raise UserError(f"adapter_name must be a non-empty string without '.', got {name!r:.40}")
        if name in loaded:
            raise UserError(f"adapter name {name!r} is already in use; pick another adapter_name or"
                            f" delete_adapters({name!r}) first")
        if self.is_prompt_model:
            _, adapter = load_prompt_adapter(self.unet, self.text_encoder, path, 1.0, False, read_any,
                                             name=name)
            self.triggers[name] = trigger_words(adapter)
        else:
            load_adapter(self.unet, path, name=name, weight=1.0, reader=read_any)
        self.added[self._source(path)] = name  # a <lora:...> tag naming this file is this adapter (add_lora)
        for other in loaded:
            self._switch_off(other)
        state = self._adapter_state()
        state.order = [name]
        if state.disabled:
            self._apply_enabled()

    def _default_adapter_name(self) -> str:
        # diffusers: default_{adapters on the UNet}; where that name is taken (after a delete) it would refuse
        taken, i = set(self._loaded()), len(layer_adapters(self.unet))
        while f"default_{i}" in taken:
            i += 1
        return f"default_{i}"

    def set_adapters(self, adapter_names: str | list[str],
                     adapter_weights: float | dict | list[float | dict | None] | None = None) -> None:
        """Make ``adapter_names`` the active adapters at ``adapter_weights`` (one value for all, one per
        name; None: 1.0); every other loaded adapter is deactivated (weight 0, its weight remembered). A value
        is a number or, as diffusers takes it, ``{"text_encoder": a, "unet": u}`` with u a number or
        ``{"down": b, "mid": c, "up": d}`` (per block: ``{"block_1": x}`` or ``{"block_1": [x0, x1]}``)."""
        names = self._known(adapter_names, "set_adapters")
        if len(set(names)) != len(names):
            raise UserError(f"set_adapters: a name is given twice in {names}")
        weights = adapter_weights
        if not isinstance(weights, list | tuple):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise UserError(f"set_adapters: {len(weights)} weights for {len(names)} adapters")
        weights = [self._adapter_weight(1.0 if w is None else w, f"set_adapters: adapter {n!r}")
                   for n, w in zip(names, weights, strict=True)]
        state = self._adapter_state()
        for other in self._loaded():
            if other not in names:
                self._switch_off(other)
        for name, w in zip(names, weights, strict=True):
            state.off.pop(name, None)
            self.set_lora_weight(name, w)
        state.order = list(names)

    def get_active_adapters(self) -> list[str]:
        """The active adapters: the last ``set_adapters``' names, or the adapter loaded last, plus any our
        own API (``add_lora``, a tag, ``set_lora_weight``) made act; in ``set_adapters``' order."""
        state = self._adapter_state()
        active = [n for n in self._loaded() if n not in state.off]
        rank = {n: i for i, n in enumerate(state.order)}
        return sorted(active, key=lambda n: rank.get(n, len(rank)))

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Every loaded adapter (active or not) by component: {"unet": [...], "text_encoder": [...]}."""
        return {part: layer_adapters(model) for part, model in self._parts().items() if layer_adapters(model)}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Unload the named adapters (from every component). If they were the active ones, the alphabetically
        first adapter left becomes active at its remembered weight (PEFT's rule, with its warning)."""
        names = self._known(adapter_names, "delete_adapters")
        was_active = self.get_active_adapters()
        state = self._adapter_state()
        for name in dict.fromkeys(names):
            self.remove_lora(name)
            state.off.pop(name, None)
        state.order = [n for n in state.order if n not in names]
        left = self._loaded()
        if was_active and left and not self.get_active_adapters():
            first = min(left)
            log.warning("adapter(s) %s were active and are deleted; %r is active now", ", ".join(names),
                        first)
            self.set_lora_weight(first, state.off.pop(first))
            state.order = [first]

    def disable_lora(self) -> None:
        """Every adapter off (the base's images) until ``enable_lora``; weights and active adapters are kept,
        adapters loaded meanwhile are disabled too. Fused adapters are unfused first."""
        self._adapter_state().disabled = True
        self._apply_enabled()

    def enable_lora(self) -> None:
        """Undo ``disable_lora``: the active adapters act again at their weights."""
        self._adapter_state().disabled = False
        self._apply_enabled()

    def fuse_lora(self, components: list[str] | tuple[str, ...] = COMPONENTS, lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the weights of ``components``, their weights
        multiplied by ``lora_scale`` (and left so: ``unfuse_lora`` does not undo the scale, as in diffusers).
        ``safe_fusing``: refuse, before changing anything, a fusion whose weights would not be finite."""
        parts = self._components(components, "fuse_lora")
        names = (self.get_active_adapters() if adapter_names is None
                 else self._known(adapter_names, "fuse_lora"))
        if self._adapter_state().disabled:
            raise UserError("fuse_lora: LoRA is disabled (disable_lora); call enable_lora first")
        lora_scale = _finite(lora_scale, "fuse_lora lora_scale")
        scaled = {}
        for name in names:
            w = self.lora_weight(name)
            te = lora_scale if "text_encoder" in parts else 1.0
            unet = lora_scale if "unet" in parts else 1.0
            scaled[name] = checked(AdapterWeight(w.text_encoder * te, w.unet * unet, dict(w.blocks), w.label),
                                   f"fuse_lora: adapter {name!r} x lora_scale")
        if safe_fusing:
            for part in parts:
                for path, layer in lora_layers(self._parts()[part]).items():
                    for name in names:
                        if name in layer.adapters:
                            m = scaled[name].module(path, text_encoder=part == "text_encoder")
                            delta = layer.adapters[name].delta_weight(m, layer.original_weight)
                            if not torch.isfinite(layer.original_weight + delta).all():
                                raise UserError(f"fuse_lora: adapter {name!r} gives non-finite weights in"
                                                f" {path}")
        for name, w in scaled.items():
            self.set_lora_weight(name, w)
        for part in parts:
            merge_lora(self._parts()[part], names)

    def unfuse_lora(self, components: list[str] | tuple[str, ...] = COMPONENTS) -> None:
        """Restore the unfused weights of ``components`` exactly; the adapters keep acting, unfused."""
        for part in self._components(components, "unfuse_lora"):
            unmerge_lora(self._parts()[part])

    @property
    def fused_loras(self) -> set[str]:
        return {n for model in self._parts().values() for layer in lora_layers(model).values()
                for n in layer.merged_adapters}

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    def unload_lora_weights(self) -> None:
        """Remove every adapter; the plain base again, except what ``fuse_lora`` folded in, which stays (as
        diffusers: fuse, then unload, leaves a model with the adapter baked in)."""
        for model in self._parts().values():
            unload_lora(model, merge=False)
        self.tag_adapters.clear()
        self.added.clear()
        self.triggers.clear()
        self.__dict__[STATE] = AdapterState()

    # ----- bookkeeping -----
    def _adapter_state(self) -> AdapterState:
        state = self.__dict__.setdefault(STATE, AdapterState())
        loaded = self._loaded()
        # forget adapters unloaded since, and switched-off ones that our own API set to a weight again
        state.off = {n: w for n, w in state.off.items() if n in loaded and self._weight(n) == 0.0}
        return state

    def _parts(self) -> dict[str, torch.nn.Module]:
        return {part: model for part, model in (("unet", self.unet), ("text_encoder", self.text_encoder))
                if model is not None}

    def _loaded(self) -> list[str]:
        """Every loaded adapter's name, in loading order (UNet, then text-encoder-only ones)."""
        return list(dict.fromkeys(n for model in self._parts().values() for n in layer_adapters(model)))

    def _switch_off(self, name: str) -> None:
        state = self._adapter_state()
        if name not in state.off:
            state.off[name] = self.lora_weight(name)  # its whole weight (parts, blocks), for set_adapters
            self.set_lora_weight(name, 0.0)

    def _adapter_weight(self, value: object, what: str) -> AdapterWeight:
        """One adapter's value of set_adapters' ``adapter_weights``: a number or diffusers' dict."""
        try:
            return from_diffusers(value, self.unet.cfg)
        except UserError as e:
            raise UserError(f"{what}: {e}") from None

    def _apply_enabled(self) -> None:
        on = not self.__dict__.setdefault(STATE, AdapterState()).disabled
        for model in self._parts().values():
            enable_lora(model, on)

    def _known(self, names: str | list[str], what: str) -> list[str]:
        """The adapter names asked for, each loaded; else a one-line UserError naming the loaded ones."""
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{what}: give an adapter name or a list of names, got {names!r:.60}")
        loaded = self._loaded()
        for n in names:
            if n not in loaded:
                raise UserError(f"{what}: no adapter named {n!r} (loaded: {', '.join(loaded) or 'none'})")
        return list(names)

    def _components(self, components, what: str) -> list[str]:
        comps = [components] if isinstance(components, str) else list(components)
        if not comps:
            raise UserError(f"{what}: components cannot be an empty list")
        for c in comps:
            if c not in COMPONENTS:
                raise UserError(f"{what}: unknown component {c!r} (choose from {', '.join(COMPONENTS)})")
        return [c for c in comps if c in self._parts()]


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r:.40}")
    return float(value)
