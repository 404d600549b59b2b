"""An adapter's weight by part: text encoder, UNet, and per-block factors of the UNet weight.

SD users steer a LoRA in three ways, and each is a multiplier per adapted module (``LoRALayer.multipliers``):
- AUTOMATIC1111's ``<lora:NAME:TE:UNET>`` (``te=`` / ``unet=``), ComfyUI's ``strength_clip`` /
  ``strength_model``: one weight for the text encoder's modules, one for the UNet's;
- the LoRA Block Weight extension's ``lbw=`` (hako-mikan/sd-webui-lora-block-weight): a list over SD's blocks,
  17 numbers (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 ... OUT11) or 26 (BASE, IN00 ... IN11,
  M00, OUT00 ... OUT11), or a preset name (``PRESETS``). BASE multiplies the text-encoder weight, each other
  slot the UNet weight of the modules in that block; a 17-list gives the 9 slots it lacks 0 (the extension's
  ``to26``), and modules outside every block (time embedding, output conv, label context) keep the UNet
  weight (the extension's ratio 1; kohya's ``svd_merge_lora`` does the same);
- diffusers' ``set_adapters(name, {"text_encoder": a, "unet": {"down": b, "mid": c, "up": d}})``, where b and
  d may be ``{"block_1": x}`` or ``{"block_1": [x0, x1]}`` (one weight per position in the block); a part or
  block not named is 1.

SD's slot numbers are CompVis' ``input_blocks`` / ``output_blocks`` indices, which kohya's
``get_lbw_block_index`` computes from diffusers names (down block L, position i: IN(3L+i+1); its
downsampler: IN(3L+3); up block j, position i: OUT(3j+i); its upsampler: OUT(3j+2)). SD has 4 levels of 2
ResBlocks; our UNet has ``len(channel_mults)`` levels of ``num_res_blocks``. Levels are matched from full
resolution, so our down level L is SD's down level L and our up block k (level n-1-k) is SD's up block
k + 4 - n: a slot then means the same place in both networks (IN04: the first block of the second level;
OUT03: the first block of the first up level with attention in SD). ``slot_table`` lists the mapping for a
UNet (docs/API.md shows the shipped base's); slots with no block in ours act on nothing. A UNet with more
than 4 levels or 2 ResBlocks per level has blocks SD's slots cannot name: block weights are refused.

The diffusers dict names our blocks directly (down block L = ``down.L``, up block k = ``up.k``, as the
diffusers export names them). Position i covers ``down.L.i`` (its ResBlock and Transformer) and a block's
down/upsampler takes position 0's weight, as diffusers' ``set_weights_and_activate_adapters`` reads
``down_blocks.L.attentions.0`` for a sampler. diffusers scales only the blocks with attention and leaves the
rest at 1 (its mid block's ResBlocks included); here a part's weight covers all of its modules. On attention
targets, diffusers' set_adapters and ours give the same images (tests/test_block_weights.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lora4diffusion.errors import UserError
from lora4diffusion.limits import lora_weight

BLOCKID26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKID17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             *(f"OUT{i:02d}" for i in range(3, 12)))
# the extension's built-in presets (DEF_WEIGHT_PRESET), 17 slots each
PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
SD_LEVELS, SD_RES = 4, 2  # SD 1.x's UNet: 4 levels of 2 ResBlocks (3 per level on the way up)
PARTS = ("down", "mid", "up")
_BLOCK = re.compile(r"^(down|up)\.(\d+)\.(\d+)(\.|$)|^(downsample|upsample)\.(\d+)(\.|$)|^(mid)_"
                    r"|^(conv_in)(\.|$)")


@dataclass(frozen=True)
class AdapterWeight:
    """An adapter's weight: ``text_encoder`` for the text encoder's modules, ``unet`` times the factor of
    the module's block (``blocks``: block -> factor, 1 when absent) for the UNet's. Blocks are named as our
    UNet's modules: ``conv_in``, ``down.L.i``, ``downsample.L``, ``mid``, ``up.k.i``, ``upsample.k``.
    ``label``: how it was given (``lbw=OUTS``), for records and messages."""

    text_encoder: float = 1.0
    unet: float = 1.0
    blocks: dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def scalar(self) -> float | None:
        """The one weight of both parts and every block, or None when they differ."""
        factors = set(self.blocks.values())
        if self.text_encoder != self.unet or factors - {1.0}:
            return None
        return self.unet

    def module(self, path: str, text_encoder: bool = False) -> float:
        """The multiplier of module ``path`` (a UNet path, or a text encoder's with ``text_encoder``)."""
        if text_encoder:
            return self.text_encoder
        block = block_of(path)
        return self.unet * self.blocks.get(block, 1.0) if block else self.unet

    def scaled(self, s: float) -> AdapterWeight:
        """Both parts times s (diffusers' cross_attention_kwargs scale); blocks keep their factors."""
        return AdapterWeight(self.text_encoder * s, self.unet * s, dict(self.blocks), self.label)

    def __str__(self) -> str:
        if self.scalar is not None:
            return f"{self.scalar:g}"
        text = f"te={self.text_encoder:g}:unet={self.unet:g}"
        return f"{text}:{self.label}" if self.label else text


def block_of(path: str) -> str | None:
    """The block a UNet module path lies in (``down.1.0``, ``downsample.1``, ``mid``, ``up.2.1``,
    ``upsample.0``, ``conv_in``), or None for modules outside every block (time embedding, output)."""
    m = _BLOCK.match(path)
    if m is None:
        return None
    if m.group(1):
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if m.group(5):
        return f"{m.group(5)}.{m.group(6)}"
    return m.group(8) or m.group(9)


def uniform(weight: float, what: str = "adapter") -> AdapterWeight:
    w = lora_weight(weight, what)
    return AdapterWeight(w, w)


def _levels(cfg) -> tuple[int, int]:
    n, r = len(cfg.channel_mults), cfg.num_res_blocks
    if n > SD_LEVELS or r > SD_RES:
        raise UserError(f"block weights follow SD's UNet (at most {SD_LEVELS} levels of {SD_RES} ResBlocks);"
                        f" this UNet has {n} levels of {r}: its blocks have no SD slot")
    return n, r


def slot_table(cfg) -> dict[str, list[str]]:
    """SD's 26 slots -> our UNet blocks in each (empty: no such block here); BASE is the text encoder."""
    n, r = _levels(cfg)
    table: dict[str, list[str]] = {s: [] for s in BLOCKID26}
    table["BASE"] = ["text encoder"]
    table["IN00"].append("conv_in")
    for level in range(n):
        for i in range(r):
            table[f"IN{3 * level + i + 1:02d}"].append(f"down.{level}.{i}")
        if level < n - 1:
            table[f"IN{3 * level + 3:02d}"].append(f"downsample.{level}")
    table["M00"].append("mid")
    for k in range(n):
        j = k + SD_LEVELS - n  # SD's up block at our up block k's resolution
        for i in range(r + 1):
            table[f"OUT{3 * j + i:02d}"].append(f"up.{k}.{i}")
        if k < n - 1:
            table[f"OUT{3 * j + 2:02d}"].append(f"upsample.{k}")
    return table


def _numbers(text: str, what: str) -> list[float]:
    out = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise UserError(f"{what}: {item.strip()!r:.20} is not a number") from None
        if not math.isfinite(v):
            raise UserError(f"{what}: {item.strip()!r:.20} is not a finite number")
        out.append(v)
    return out


def lbw_factors(spec: str) -> dict[str, float]:
    """``lbw=`` text -> SD's 26 slots -> factor: a preset name (``PRESETS``) or 17 / 26 comma-separated
    numbers (R and U, the extension's random values, are not taken: a seed must give the same image)."""
    text = spec.strip()
    what = f"lbw={text[:60]}"
    values = _numbers(PRESETS[text.upper()], what) if text.upper() in PRESETS else None
    if values is None:
        if "," not in text:
            raise UserError(f"{what}: not a preset ({', '.join(PRESETS)}) nor a list of 17 or 26 numbers")
        values = _numbers(text, what)
    if len(values) == 17:
        slots = dict.fromkeys(BLOCKID26, 0.0)  # the extension's to26: slots a 17-list lacks are 0
        slots.update(zip(BLOCKID17, values, strict=True))
        return slots
    if len(values) == 26:
        return dict(zip(BLOCKID26, values, strict=True))
    sdxl = " (12 and 20 are SDXL's layouts)" if len(values) in (12, 20) else ""
    raise UserError(f"{what}: {len(values)} numbers; block weights take 17 or 26 (SD 1.x's slots){sdxl}")


def from_lbw(te: float, unet: float, spec: str, cfg) -> AdapterWeight:
    """A1111's te / unet weights with a LoRA Block Weight list or preset, on a UNet of config ``cfg``."""
    slots = lbw_factors(spec)
    table = slot_table(cfg)
    blocks = {block: slots[slot] for slot, ours in table.items() if slot != "BASE" for block in ours}
    base = slots["BASE"]
    return checked(AdapterWeight(te * base, unet, blocks, f"lbw={spec.strip()}"), "lbw")


def from_diffusers(weights: float | dict, cfg, has_text_encoder: bool = True) -> AdapterWeight:
    """diffusers' per-adapter value of ``set_adapters``' ``adapter_weights``: a number, or
    ``{"text_encoder": a, "unet": u}`` with u a number or ``{"down": ..., "mid": ..., "up": ...}``."""
    if not isinstance(weights, dict):
        return uniform(_number(weights, "adapter weight"))
    unknown = sorted(set(weights) - {"unet", "text_encoder"})
    if unknown:
        raise UserError(f"adapter weights: unknown component {unknown[0]!r} (give 'unet' and/or"
                        " 'text_encoder')")
    te = _number(weights.get("text_encoder", 1.0), "text_encoder weight")
    unet = weights.get("unet", 1.0)
    if not isinstance(unet, dict):
        return checked(AdapterWeight(te, _number(unet, "unet weight")), "adapter weights")
    bad = sorted(set(unet) - set(PARTS))
    if bad:
        raise UserError(f"unet weights: unknown part {bad[0]!r} (give 'down', 'mid' and/or 'up', as"
                        " diffusers)")
    n, r = len(cfg.channel_mults), cfg.num_res_blocks
    blocks: dict[str, float] = {"mid": _mid(unet.get("mid", 1.0))}
    for side, count in (("down", r), ("up", r + 1)):
        value = unet.get(side, 1.0)
        per_block = value if isinstance(value, dict) else {f"block_{b}": value for b in range(n)}
        for key, v in per_block.items():
            b = _block_index(key, side, n)
            positions = v if isinstance(v, list) else [v] * count
            if len(positions) == 1:
                positions = positions * count
            if len(positions) != count:
                raise UserError(f"unet weights: {side}.{key} has {len(positions)} weights; its block has"
                                f" {count} positions (give one number, or {count})")
            for i, w in enumerate(positions):
                blocks[f"{side}.{b}.{i}"] = _number(w, f"unet weights {side}.{key}")
            if b < n - 1:  # a sampler takes position 0's weight, as diffusers reads attentions.0 for it
                blocks[f"{side}sample.{b}"] = blocks[f"{side}.{b}.0"]
    return checked(AdapterWeight(te, 1.0, blocks, "blocks"), "adapter weights")


def _mid(value) -> float:
    if isinstance(value, list):
        if len(value) != 1:
            raise UserError(f"unet weights: mid takes one weight, got {len(value)}")
        value = value[0]
    return _number(value, "unet weights mid")


def _block_index(key: object, side: str, n: int) -> int:
    m = re.fullmatch(r"block_(\d+)", key) if isinstance(key, str) else None
    if m is None or int(m.group(1)) >= n:
        raise UserError(f"unet weights: {side} has blocks block_0 ... block_{n - 1}, got {key!r:.30}")
    return int(m.group(1))


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r:.40}")
    return float(value)


def checked(weight: AdapterWeight, what: str) -> AdapterWeight:
    """Every resulting multiplier within limits.MAX_LORA_WEIGHT."""
    lora_weight(weight.text_encoder, f"{what}: text encoder")
    for block, factor in [(None, 1.0), *weight.blocks.items()]:
        lora_weight(weight.unet * factor, f"{what}: UNet" + (f" block {block}" if block else ""))
    return weight


__all__ = ["BLOCKID17", "BLOCKID26", "PRESETS", "AdapterWeight", "block_of", "checked", "from_diffusers",
           "from_lbw", "lbw_factors", "slot_table", "uniform"]
