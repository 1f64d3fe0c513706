"""Prompt attachments of a timm Vision Transformer (kinds ``l2p``, ``dualprompt``,
``coda_prompt`` of :mod:`clrun.models.peft`): a prompt pool with keys, selected by a query, that
either prepends prompt tokens to the token sequence (L2P) or prefixes the keys and values of the
attention of chosen blocks (DualPrompt, CODA-Prompt: prefix tuning).

One forward pass of the model's ViT with an active prompt attachment:

1. a forward pre-hook on the ViT runs the **query pass**: the same ViT, in eval mode, without
   gradient and with every attachment of the model switched off (:func:`peft.only` with none),
   gives the frozen pre-trained embedding of the input ([CLS] after the final norm for ViT-B/16:
   the papers' query ``q(x)``);
2. the attachment turns the query into prompts (:meth:`PromptAttachment.select`) and, in
   training mode, an auxiliary loss in ``aux`` (the key-query surrogate loss of L2P and
   DualPrompt, CODA-P's orthogonality penalty) that the method's ``penalty`` component adds;
3. hooks on the blocks insert them: L2P's tokens after the [CLS] token before the first block
   (with the [CLS] position embedding, as the official PyTorch port pads the position embedding),
   read back as the mean of the prompt tokens' final outputs (L2P's ``head_type: prompt``);
   prefixes replace the output of the chosen blocks' ``attn`` by attention whose keys and values
   start with the prefix (``prefix_attention``: the queries are the block's own tokens only).

Blocks without prompts run unchanged, so their outputs are bit-identical with and without the
attachment. ``task`` (the experience being trained; saved with the model) tells DualPrompt which
E-prompt to train and CODA-P which components are the current ones; the method's component sets
it with :meth:`PromptAttachment.start` before each experience.

Reference code where the papers are silent: LAMDA-PILOT (``backbone/prompt.py``,
``backbone/vit_l2p.py``, ``backbone/vit_dualprompt.py``, ``models/l2p.py``,
``models/dualprompt.py``, ``exps/{l2p,dualprompt,coda_prompt}.json``), whose L2P and DualPrompt
are the PyTorch ports (JH-LEE-KR) of the authors' JAX code, and the CODA-Prompt authors'
``models/zoo.py`` (GT-RIPL/CODA-Prompt; the per-task Gram-Schmidt version in PILOT).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.errors import ConfigError
from clrun.models import peft


def prefix_attention(attn: nn.Module, x: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
    """timm ``Attention`` on tokens ``x`` (B, N, D) whose keys and values are prefixed by ``pk``,
    ``pv`` (B, P, D): queries come from the N tokens only, so the output keeps N tokens
    (prefix tuning, as PILOT's ``PreT_Attention`` and the CODA-P authors' ``Attention``)."""
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk = pk.to(k.dtype).reshape(b, -1, h, hd).transpose(1, 2)
    pv = pv.to(v.dtype).reshape(b, -1, h, hd).transpose(1, 2)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    out = out.transpose(1, 2).reshape(b, n, h * hd)
    out = getattr(attn, "norm", nn.Identity())(out)
    return attn.proj_drop(attn.proj(out))


def cosine(q: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarity of every query (B, D) to every key (K, D): (B, K)."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T


def top_n(sim: Tensor, n: int, batchwise: bool) -> Tensor:
    """Indices (B, n) of the n keys most similar to each query; ``batchwise``: the n keys chosen
    most often over the batch, for every sample (ties: the lower index first), as the L2P
    authors' ``batchwise_prompt``."""
    idx = sim.topk(n, dim=1).indices
    if not batchwise:
        return idx
    counts = torch.bincount(idx.flatten(), minlength=sim.shape[1])
    major = torch.sort(counts, descending=True, stable=True).indices[:n]
    return major.unsqueeze(0).expand(sim.shape[0], -1)


class PromptAttachment(peft.Attachment):
    """The query pass and the per-forward bookkeeping shared by the prompt kinds."""

    def __init__(self, vit, **options):
        super().__init__(vit, **options)
        self.task = 0  # the experience being trained (set by the method, saved)
        self.aux: Tensor | None = None  # the auxiliary loss of the last training forward
        self._prefixes: dict[int, tuple[Tensor, Tensor]] = {}

    def install(self, vit: nn.Module) -> None:
        for name in ("blocks", "norm"):
            if not hasattr(vit, name):
                raise ConfigError(f"{self.kind}: {type(vit).__name__} has no {name}")
        vit.register_forward_pre_hook(self._begin)
        vit.register_forward_hook(self._end)

    def start(self, task: int) -> None:
        """Before training on experience ``task``."""
        self.task = int(task)

    def query(self, x: Tensor) -> Tensor:
        """The frozen pre-trained embedding of ``x``: the ViT in eval mode, no gradient, every
        attachment off."""
        vit, model = self._vit, self._model
        was = vit.training
        try:
            vit.train(False)
            with torch.no_grad(), peft.only(model, ()):
                return vit(x).float()
        finally:
            vit.train(was)

    def _begin(self, module, args):
        if not self.active:
            return None
        self.select(self.query(args[0]))
        return None

    def _end(self, module, args, out):
        self._prefixes = {}
        return None

    def select(self, q: Tensor) -> None:
        raise NotImplementedError

    def _prefix(self, i: int, module, args, out):
        p = self._prefixes.get(i) if self.active else None
        if p is None:
            return None
        return prefix_attention(module, args[0], *p)

    def _install_prefixes(self, vit: nn.Module, layers: list[int]) -> None:
        for i in layers:
            if not 0 <= i < len(vit.blocks):
                raise ConfigError(
                    f"{self.kind}: block {i} does not exist; the ViT has {len(vit.blocks)} blocks"
                )
            attn = getattr(vit.blocks[i], "attn", None)
            if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
                raise ConfigError(
                    f"{self.kind}: block {i}'s attention is not timm's Attention (qkv, proj)"
                )
            attn.register_forward_hook(partial(self._prefix, i))

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "task": self.task}

    def set_extra_state(self, state: dict) -> None:
        self.task = int(state.get("task", 0))
        super().set_extra_state(state)


def _uniform(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape).uniform_(-1.0, 1.0))


class L2PPrompt(PromptAttachment):
    """L2P (Wang et al., CVPR 2022): ``pool`` prompts of ``length`` tokens with a key each
    (prompts and keys uniform in [-1, 1]); the ``top_n`` prompts whose keys are most similar
    (cosine) to the query are prepended, after the [CLS] token; the features are the mean of the
    prompt tokens' outputs. ``aux``: the surrogate loss, Σ over the chosen keys of
    1 − cos(q, k), averaged over the batch (the gradient of the authors' −Σ cos / B)."""

    kind = "l2p"

    def __init__(
        self, vit, pool: int = 10, length: int = 5, top_n: int = 5, batchwise: bool = True
    ):
        super().__init__(vit, pool=pool, length=length, top_n=top_n, batchwise=batchwise)
        if not 1 <= top_n <= pool:
            raise ConfigError(f"l2p: top_n={top_n} must be between 1 and the pool size {pool}")
        self.prompts = _uniform(pool, length, vit.embed_dim)
        self.keys = _uniform(pool, vit.embed_dim)
        self._tokens: Tensor | None = None
        self._features: Tensor | None = None

    def install(self, vit: nn.Module) -> None:
        super().install(vit)
        if getattr(vit, "norm_pre", None) is None:
            raise ConfigError(f"l2p: {type(vit).__name__} has no norm_pre")
        vit.norm_pre.register_forward_pre_hook(self._prepend)
        vit.norm.register_forward_hook(self._pool)

    def select(self, q: Tensor) -> None:
        sim = cosine(q, self.keys)
        batchwise = self.options["batchwise"] and self.training
        idx = top_n(sim, self.options["top_n"], batchwise)
        self._tokens = self.prompts[idx].flatten(1, 2)  # (B, top_n · length, D)
        if self.training:
            self.aux = (1 - sim.gather(1, idx)).sum(1).mean()

    def _prepend(self, module, args):
        if not self.active or self._tokens is None:
            return None
        x, vit = args[0], self._vit
        p = self._tokens.to(x.dtype)
        if vit.pos_embed is not None and vit.cls_token is not None and not vit.no_embed_class:
            p = p + vit.pos_embed[:, :1].to(x.dtype)  # the [CLS] position, as the port's pad
        k = vit.num_prefix_tokens
        return (torch.cat([x[:, :k], p, x[:, k:]], dim=1), *args[1:])

    def _pool(self, module, args, out):
        if not self.active or self._tokens is None:
            return None
        k, n = self._vit.num_prefix_tokens, self._tokens.shape[1]
        self._features = out[:, k : k + n].mean(dim=1)
        return None

    def _end(self, module, args, out):
        features, self._tokens, self._features = self._features, None, None
        if not self.active or features is None:
            return None
        vit = self._vit
        return vit.head(vit.head_drop(vit.fc_norm(features)))


class DualPromptPrefix(PromptAttachment):
    """DualPrompt (Wang et al., ECCV 2022): a G-prompt shared by all experiences in blocks
    ``g_layers`` and a pool of E-prompts, one per experience with its key, in blocks
    ``e_layers``, both by prefix tuning (a key prefix and a value prefix of ``length`` /
    ``g_length`` tokens each, uniform in [-1, 1], as the authors' code). Training uses the E-prompt
    of the experience being trained (``task``); evaluation the one whose key is most similar to
    the query. ``aux``: 1 − cos(q, k_task), averaged over the batch."""

    kind = "dualprompt"

    def __init__(
        self,
        vit,
        pool: int = 10,
        length: int = 5,
        g_length: int = 5,
        g_layers: list[int] | tuple[int, ...] = (0, 1),
        e_layers: list[int] | tuple[int, ...] = (2, 3, 4),
    ):
        g_layers, e_layers = [int(i) for i in g_layers], [int(i) for i in e_layers]
        super().__init__(
            vit, pool=pool, length=length, g_length=g_length, g_layers=g_layers, e_layers=e_layers
        )
        d = vit.embed_dim
        self.g = _uniform(len(g_layers), 2, g_length, d)
        self.e = _uniform(len(e_layers), 2, pool, length, d)
        self.keys = _uniform(pool, d)

    def install(self, vit: nn.Module) -> None:
        super().install(vit)
        self._install_prefixes(vit, sorted({*self.options["g_layers"], *self.options["e_layers"]}))

    def start(self, task: int) -> None:
        """A new experience's E-prompt starts as a copy of the previous one (the authors'
        ``shared_prompt_pool``)."""
        super().start(task)
        if 0 < task < self.options["pool"]:
            with torch.no_grad():
                self.e[:, :, task] = self.e[:, :, task - 1]

    def select(self, q: Tensor) -> None:
        if self.task >= self.options["pool"]:
            raise ConfigError(
                f"dualprompt: experience {self.task} has no E-prompt; the pool holds "
                f"{self.options['pool']} (one per experience)"
            )
        sim = cosine(q, self.keys)
        if self.training:
            idx = torch.full((q.shape[0],), self.task, dtype=torch.long, device=q.device)
            self.aux = (1 - sim[:, self.task]).mean()
        else:
            idx = sim.argmax(dim=1)
        b = q.shape[0]
        prefixes: dict[int, list[Tensor]] = {}
        for j, i in enumerate(self.options["e_layers"]):
            prefixes[i] = [self.e[j, 0, idx], self.e[j, 1, idx]]  # (B, length, D) each
        for j, i in enumerate(self.options["g_layers"]):
            gk, gv = (self.g[j, s].expand(b, -1, -1) for s in (0, 1))
            ek, ev = prefixes.get(i, [gk[:, :0], gv[:, :0]])
            prefixes[i] = [torch.cat([ek, gk], 1), torch.cat([ev, gv], 1)]
        self._prefixes = {i: (k, v) for i, (k, v) in prefixes.items()}


def gram_schmidt(rows: Tensor, new: slice) -> Tensor:
    """``rows`` (n, d) with the rows in ``new`` replaced by random Gaussian vectors made
    orthogonal to every row before them and to each other (Gram-Schmidt, twice for numerical
    safety), unit length: CODA-P's initialisation of a new experience's components. The rows
    before ``new`` (trained, so no longer orthogonal) are first made an orthonormal basis of
    their span; the authors' code subtracts the projections onto each of them, which is the same
    while they are orthogonal (the first experience) and only approximately orthogonal after."""
    out = rows.clone()
    basis: list[Tensor] = []
    for k in range(new.stop):
        v = (
            out[k]
            if k < new.start
            else torch.randn(rows.shape[1], dtype=rows.dtype).to(rows.device)
        )
        if k < new.start and v.norm() < 1e-8:
            continue
        for _ in range(2):
            for b in basis:
                v = v - (v @ b) * b
        if v.norm() < 1e-6:  # an earlier row in the span of those before it
            continue
        v = v / v.norm()
        basis.append(v)
        if k >= new.start:
            out[k] = v
    return out


class CODAPrompt(PromptAttachment):
    """CODA-Prompt (Smith et al., CVPR 2023): in blocks ``layers``, a prompt is a weighted sum of
    ``pool`` components P_m (``length`` tokens), weight α_m = cos(q ⊙ A_m, K_m) with a key K_m
    and an attention vector A_m per component; the first half of its tokens prefixes the keys, the
    second half the values. The pool is split evenly over the ``tasks`` experiences: experience t
    adds its components (Gram-Schmidt initialised against the earlier ones at :meth:`start`) and
    trains only them; earlier ones are separate frozen parameters (no gradient at all), later ones
    are not used yet. ``aux``: the orthogonality penalty Σ over blocks of ‖KKᵀ − I‖², ‖AAᵀ − I‖²,
    ‖PPᵀ − I‖² (means over entries) of the components in use."""

    kind = "coda_prompt"

    def __init__(
        self,
        vit,
        tasks: int,
        pool: int = 100,
        length: int = 8,
        layers: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4),
    ):
        layers = [int(i) for i in layers]
        super().__init__(vit, tasks=tasks, pool=pool, length=length, layers=layers)
        per = pool // tasks
        if per < 1:
            raise ConfigError(f"coda_prompt: pool={pool} is smaller than the {tasks} experiences")
        if pool > vit.embed_dim:
            raise ConfigError(
                f"coda_prompt: pool={pool} orthogonal components do not fit in {vit.embed_dim} "
                "dimensions"
            )
        if length < 2 or length % 2:
            raise ConfigError(f"coda_prompt: length={length} must be even (key half, value half)")
        d, n = vit.embed_dim, len(layers)
        # one parameter per experience: the frozen past ones get no gradient (and no optimiser
        # update, weight decay or momentum included), not merely a zero one
        self.k = nn.ParameterList(nn.Parameter(torch.zeros(n, per, d)) for _ in range(tasks))
        self.a = nn.ParameterList(nn.Parameter(torch.zeros(n, per, d)) for _ in range(tasks))
        self.p = nn.ParameterList(
            nn.Parameter(torch.zeros(n, per, length, d)) for _ in range(tasks)
        )

    def install(self, vit: nn.Module) -> None:
        super().install(vit)
        self._install_prefixes(vit, self.options["layers"])

    def start(self, task: int) -> None:
        """Experience ``task``'s components: Gram-Schmidt against the earlier ones (per block),
        the only trainable ones."""
        if task >= self.options["tasks"]:
            raise ConfigError(
                f"coda_prompt: experience {task} has no components; the pool was split over "
                f"{self.options['tasks']} experiences"
            )
        super().start(task)
        per = self.options["pool"] // self.options["tasks"]
        new = slice(task * per, (task + 1) * per)
        with torch.no_grad():
            for chunks in (self.k, self.a, self.p):
                every = torch.cat(list(chunks[: task + 1]), dim=1)  # (layers, used, ...)
                for j in range(every.shape[0]):
                    rows = gram_schmidt(every[j].flatten(1), new)
                    chunks[task][j].copy_(rows[new].view_as(chunks[task][j]))
        self.set_trainable(True)

    def set_trainable(self, trainable: bool) -> None:
        for chunks in (self.k, self.a, self.p):
            for t, param in enumerate(chunks):
                param.requires_grad_(trainable and t == self.task)

    def select(self, q: Tensor) -> None:
        used = self.task + 1
        half = self.options["length"] // 2
        penalty = q.new_zeros(())
        self._prefixes = {}
        for j, i in enumerate(self.options["layers"]):
            k = torch.cat([c[j] for c in self.k[:used]])  # (M, D)
            a = torch.cat([c[j] for c in self.a[:used]])
            p = torch.cat([c[j] for c in self.p[:used]])  # (M, length, D)
            weights = cosine_rows(q.unsqueeze(1) * a, k)  # (B, M)
            prompt = torch.einsum("bm,mld->bld", weights, p)
            self._prefixes[i] = (prompt[:, :half], prompt[:, half:])
            if self.training:
                penalty = penalty + ortho(k) + ortho(a) + ortho(p.flatten(1))
        self.aux = penalty if self.training else None


def cosine_rows(x: Tensor, keys: Tensor) -> Tensor:
    """cos(x[b, m], keys[m]) for queries already weighted per component: (B, M, D), (M, D) →
    (B, M)."""
    return (F.normalize(x, dim=2) * F.normalize(keys, dim=1)).sum(2)


def ortho(t: Tensor) -> Tensor:
    """mean((t tᵀ − I)²): CODA-P's orthogonality penalty of the rows of ``t``."""
    eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
    return ((t @ t.T - eye) ** 2).mean()


KINDS = {"l2p": L2PPrompt, "dualprompt": DualPromptPrefix, "coda_prompt": CODAPrompt}
