"""A small CLIP-style text encoder (Radford et al. 2021, the text tower SD 1.x conditions on).

    ids [B, L] -> token_embedding + position_embedding
               -> n x [x + self_attn(layer_norm1(x)) with a causal mask;  x + mlp(layer_norm2(x))]
               -> final_layer_norm -> last hidden state [B, L, D]   (the UNet's cross-attention context)
    pooled [B, D] = the last hidden state at the first end-of-text token (SDXL adds such a pooled text
                    embedding to the timestep embedding)

Pre-LayerNorm blocks; attention projections q_proj/k_proj/v_proj/out_proj (with biases, scale head_dim^-1/2);
MLP fc1 -> quick-GELU (x * sigmoid(1.702 x), CLIP's activation) -> fc2. Module names are transformers'
CLIPTextModel's without its prefixes, so `formats/transformers_clip.py` converts weights one to one and LoRA
targets read as in kohya's `lora_te_*` files.

Causal attention, no padding mask, as SD runs CLIP: a position only sees itself and what comes before, so the
states up to the first end-of-text token do not depend on the padding after it.

Added tokens (textual inversion, Gal et al. 2022): ``added_tokens`` holds the vectors of placeholder tokens
(Tokenizer.add_token) as their own parameters, apart from the frozen base rows. With any loaded, the token
embedding reads its rows from [base rows; zero rows for the CLIP ids no prompt produces; added vectors], the
table diffusers builds when it loads the same embedding, so the ids are CLIPTokenizer's. They are left out of
the state dict: a model folder, its export and its fingerprint stay the base's.

Default size (width 64, 2 layers, 4 heads of 16, MLP 256; ~0.11 M parameters): prompts here are at most 14
words from a 44-word vocabulary and only have to carry a digit, a style and a trigger word to the UNet, which
cross-attends to every position itself. Width 64 is the UNet's default context_dim, so the output plugs in
unchanged; heads of 16 match the UNet's head_dim. A 12-layer 512-wide CLIP would be 60x the UNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora4diffusion.errors import UserError
from lora4diffusion.models.tokenizer import Tokenizer


@dataclass
class TextEncoderConfig:
    vocab_size: int  # ids a prompt can produce: Tokenizer.vocab_size (words + bos + eos)
    eos_token_id: int  # the pooled state is taken at the first of these: Tokenizer.eos_id
    context_length: int = 16  # positions (Tokenizer.context_length; CLIP's max_position_embeddings)
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5

    # Upper bounds far above CLIP's own (49,408 ids, 77 positions, width 768, 12 layers): a config from
    # elsewhere asking for 2**40 is refused before the network is built (and allocated).
    LIMITS = {"vocab_size": 1 << 20, "eos_token_id": 1 << 20, "context_length": 4096, "width": 8192,
              "layers": 64, "heads": 256, "mlp_ratio": 16}

    def __post_init__(self) -> None:
        for name in ("vocab_size", "eos_token_id", "context_length", "width", "layers", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"text encoder config: {name} must be an integer, got {str(v)[:40]}")
            if v > self.LIMITS[name]:
                raise UserError(f"text encoder config: {name} must be <= {self.LIMITS[name]}, got"
                                f" {str(v)[:40]}")
        for name in ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise UserError(f"text encoder config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise UserError(
                f"text encoder config: eos_token_id {self.eos_token_id} is outside the vocabulary"
                f" (0..{self.vocab_size - 1})"
            )
        if self.width % self.heads:
            raise UserError(f"text encoder config: width {self.width} is not divisible by heads {self.heads}")
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise UserError(
                "text encoder config: layer_norm_eps must be a positive float, got"
                f" {str(self.layer_norm_eps)[:40]}"
            )

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, **overrides: int | float) -> TextEncoderConfig:
        """The config that fits a `Tokenizer` (vocabulary, eos id, context length), plus size overrides."""
        return cls(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                   context_length=tokenizer.context_length, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown text encoder config keys: {sorted(unknown)}")
        missing = [k for k in ("vocab_size", "eos_token_id") if k not in d]
        if missing:
            raise UserError(f"text encoder config: missing {', '.join(missing)}")
        return cls(**d)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x) (what its weights were trained with)."""
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with CLIP's projection names."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = (
            p(x).reshape(b, n, h, d // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        w = (q @ k.transpose(-1, -2)) * (d // h) ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)  # True = a later position
        w = w.masked_fill(causal, float("-inf"))
        w = w.float().softmax(dim=-1).to(v.dtype)  # fp32 softmax keeps bf16 autocast from saturating
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class AddedTokens(nn.Module):
    """The vectors of added tokens, in id order from ``first_id`` (the CLIP vocabulary's size): one [n, D]
    parameter per token, named by its position ("0", "1", ...). Never saved with the model (its state-dict
    hooks write and read nothing): an embedding file carries them (lora/embeddings.py)."""

    def __init__(self):
        super().__init__()
        self.tokens: list[str] = []
        self.first_id: int | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vectors(self) -> list[nn.Parameter]:
        return [self._parameters[str(i)] for i in range(len(self.tokens))]

    def vector(self, token: str) -> nn.Parameter:
        if token not in self.tokens:
            raise UserError(f"token {token} is not loaded in this text encoder")
        return self._parameters[str(self.tokens.index(token))]

    def add(self, token: str, vectors: torch.Tensor, first_id: int) -> nn.Parameter:
        """Append ``token``'s vectors [n, D] (frozen; a trainer sets requires_grad)."""
        if self.first_id is not None and first_id != self.first_id:
            raise UserError(f"token {token}: added tokens start at id {self.first_id}, not {first_id}")
        self.first_id = first_id
        param = nn.Parameter(vectors.detach().clone().float(), requires_grad=False)
        self.register_parameter(str(len(self.tokens)), param)
        self.tokens.append(token)
        return param

    def remove_last(self) -> None:
        del self._parameters[str(len(self.tokens) - 1)]
        self.tokens.pop()
        if not self.tokens:
            self.first_id = None

    def table(self, base: torch.Tensor) -> torch.Tensor:
        """[base rows; zero rows up to first_id; every token's vectors]: the token embedding of CLIP ids."""
        gap = base.new_zeros(self.first_id - base.shape[0], base.shape[1])
        return torch.cat([base, gap, *(v.to(base.dtype) for v in self.vectors)])

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ARG002 - nothing to save
        return

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: ARG002 - nothing to load: they come from embedding files
        return


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.added_tokens = AddedTokens()  # textual inversion's tokens, when an embedding is loaded
        self._init_weights()

    def _init_weights(self) -> None:
        # CLIP's initialisation (transformers' CLIPPreTrainedModel): embeddings N(0, 0.02); residual-branch
        # inputs scaled by (2 * layers)^-1/2 so the residual stream's variance does not grow with depth.
        d, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        in_std = d**-0.5 * (2 * n) ** -0.5
        for layer in self.layers:
            for p, std in ((layer.self_attn.q_proj, in_std), (layer.self_attn.k_proj, in_std),
                           (layer.self_attn.v_proj, in_std), (layer.self_attn.out_proj, d**-0.5),
                           (layer.mlp.fc1, (2 * d) ** -0.5), (layer.mlp.fc2, in_std)):
                nn.init.normal_(p.weight, std=std)
                nn.init.zeros_(p.bias)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] (L <= context_length) -> (last hidden state [B, L, D], pooled eos state [B, D])."""
        if ids.dim() != 2 or ids.shape[1] > self.cfg.context_length:
            raise UserError(
                f"text encoder input must be [batch, <= {self.cfg.context_length}] ids,"
                f" got {tuple(ids.shape)}"
            )
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed_tokens(ids) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        # The first eos of each row (argmax of a 0/1 row picks the first 1), as CLIPTextModel does; our
        # tokenizer puts exactly one eos before the padding (which is eos too).
        first_eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), first_eos]
        return x, pooled

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token vectors of ``ids``: the base rows (bit for bit the base's path while no token is added),
        or rows of ``added_tokens.table`` (the same values for every base id)."""
        if not len(self.added_tokens):
            return self.token_embedding(ids)
        return F.embedding(ids, self.added_tokens.table(self.token_embedding.weight))


__all__ = ["AddedTokens", "TextEncoder", "TextEncoderConfig", "quick_gelu"]
