"""Prompt methods on a timm ViT (clrun.models.prompts; strategies l2p, dualprompt, coda_prompt):
top-N selection and the surrogate loss by hand, prefixes that touch only their blocks, frozen
past components, a frozen ViT, refusals. Runs and resume: the every-strategy tests
(VIT_STRATEGIES in conftest.py)."""

import math

import pytest
import torch
from conftest import TIMM_TINY, vit_state

from clrun.config import ConfigError
from clrun.models import peft
from clrun.models.prompts import gram_schmidt, prefix_attention, top_n
from clrun.strategies import L2P, CODAPrompt, DualPrompt

timm = pytest.importorskip("timm")


def padded(rows: list[list[float]], d: int) -> torch.Tensor:
    out = torch.zeros(len(rows), d)
    out[:, : len(rows[0])] = torch.tensor(rows)
    return out


# ------------------------------------------------------------------ L2P: selection and loss


def test_top_n_per_sample_and_batchwise_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1], [0.6, 0.0, 0.4, 0.5]])
    assert top_n(sim, 2, False).tolist() == [[0, 2], [1, 2], [0, 3]]
    # chosen: 0 twice, 2 twice, 1 once, 3 once → 0 and 2 (equal counts: lower index first)
    assert top_n(sim, 2, True).tolist() == [[0, 2]] * 3
    assert top_n(sim, 1, True).tolist() == [[0]] * 3  # the top ones: 0, 1, 0


def test_l2p_selects_top_n_keys_and_surrogate_loss_by_hand():
    state = vit_state()
    a = peft.attach(state.model, "l2p", pool=4, length=3, top_n=2, batchwise=False)
    d = state.model.backbone.net.embed_dim
    with torch.no_grad():
        a.keys.copy_(padded([[1, 0], [0, 1], [1, 1], [-1, 0]], d))
    q = padded([[1, 0], [0.6, 0.8]], d)
    a.train()
    a.select(q)
    # cos: q0 → (1, 0, 1/√2, -1): keys 0, 2; q1 → (0.6, 0.8, 1.4/√2, -0.6): keys 2, 1
    expected = torch.cat(
        [a.prompts[[0, 2]].flatten(0, 1)[None], a.prompts[[2, 1]].flatten(0, 1)[None]]
    )
    assert torch.equal(a._tokens, expected)
    hand = ((1 - 1) + (1 - 1 / math.sqrt(2)) + (1 - 1.4 / math.sqrt(2)) + (1 - 0.8)) / 2
    assert a.aux.item() == pytest.approx(hand, abs=1e-6)
    # batch-wise: keys 2 (twice), then 0 and 1 (once each: 0 first) for both samples
    a.options["batchwise"] = True
    a.select(q)
    assert torch.equal(a._tokens, a.prompts[[2, 0]].flatten(0, 1).expand(2, -1, -1))
    hand = ((1 - 1 / math.sqrt(2)) + (1 - 1) + (1 - 1.4 / math.sqrt(2)) + (1 - 0.6)) / 2
    assert a.aux.item() == pytest.approx(hand, abs=1e-6)
    # at evaluation: per sample, no auxiliary loss
    a.aux = None
    a.eval()
    a.select(q)
    assert torch.equal(a._tokens, expected) and a.aux is None


def test_l2p_forward_prepends_prompts_and_reads_their_mean():
    state = vit_state()
    model, vit = state.model, state.model.backbone.net
    a = peft.attach(model, "l2p", pool=4, length=3, top_n=2)
    model.eval()
    x = torch.randn(5, 3, 16, 16)
    seen = []

    def keep(module, args):
        seen.append(args[0].shape)

    hook = vit.blocks[0].register_forward_pre_hook(keep)
    with torch.no_grad():
        out = model.backbone(x)
    hook.remove()
    n_tokens = 1 + vit.patch_embed.num_patches
    # the query pass (the plain ViT), then the prompted pass: 2 prompts × 3 tokens after [CLS]
    assert seen == [(5, n_tokens, vit.embed_dim), (5, n_tokens + 6, vit.embed_dim)]
    assert out.shape == (5, vit.embed_dim)
    # the query: the ViT without any attachment
    with torch.no_grad(), peft.only(model, ()):
        assert torch.equal(a.query(x), vit(x))


# ------------------------------------------------------------------ DualPrompt: prefixes


def block_outputs(vit, x):
    outs, hooks = [], [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in vit.blocks]
    with torch.no_grad():
        vit(x)
    for h in hooks:
        h.remove()
    return outs


def test_dualprompt_prefixes_change_only_the_chosen_blocks():
    state = vit_state("model.create_args.depth=6")
    model, vit = state.model, state.model.backbone.net
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    before = block_outputs(vit, x)
    peft.attach(model, "dualprompt", pool=3, g_layers=[2], e_layers=[3, 4])
    model.eval()
    after = block_outputs(vit, x)
    # the query pass runs first (6 outputs, the plain ViT), then the prompted pass
    assert all(torch.equal(b, q) for b, q in zip(before, after[:6], strict=True))
    prompted = after[6:]
    assert torch.equal(prompted[0], before[0]) and torch.equal(prompted[1], before[1])
    assert not torch.equal(prompted[2], before[2])
    assert all(p.shape == b.shape for p, b in zip(prompted, before, strict=True))


def test_dualprompt_trains_the_experience_e_prompt_and_matches_keys_at_evaluation():
    state = vit_state()
    model = state.model
    a = peft.attach(model, "dualprompt", pool=3, g_layers=[0], e_layers=[1])
    a.start(1)
    model.train()
    x = torch.randn(4, 3, 16, 16)
    (model.backbone(x).sum() + a.aux).backward()
    assert a.e.grad[:, :, 1].abs().sum() > 0 and a.g.grad.abs().sum() > 0
    assert torch.all(a.e.grad[:, :, [0, 2]] == 0)
    assert torch.all(a.keys.grad[[0, 2]] == 0) and a.keys.grad[1].abs().sum() > 0
    assert not any(p.grad is not None for p in model.backbone.net.parameters())
    # evaluation: the E-prompt of the key closest to the query
    model.eval()
    q = a.query(x)
    with torch.no_grad():
        a.keys.copy_(torch.stack([-q[0], q[0], torch.zeros_like(q[0])]))
        a.select(q)
    assert torch.equal(a._prefixes[1][0][0], a.e[0, 0, 1])


# ------------------------------------------------------------------ CODA-P: components


def test_gram_schmidt_new_rows_are_orthonormal_to_the_earlier():
    torch.manual_seed(0)
    rows = torch.zeros(6, 10)
    rows[:2] = torch.randn(2, 10)  # trained rows of an earlier experience: not orthonormal
    out = gram_schmidt(rows, slice(2, 4))
    assert torch.equal(out[:2], rows[:2]) and torch.equal(out[4:], rows[4:])
    assert torch.allclose(out[2:4] @ out[2:4].T, torch.eye(2), atol=1e-5)
    # each new row is orthogonal to the rows before it
    assert torch.allclose(out[2] @ out[:2].T, torch.zeros(2), atol=1e-5)
    assert torch.allclose(out[3] @ out[:3].T, torch.zeros(3), atol=1e-5)


def test_coda_past_components_get_no_gradient_and_stay_bit_identical():
    state = vit_state()
    model, x = state.model, torch.randn(8, 3, 16, 16)
    a = peft.attach(model, "coda_prompt", tasks=3, pool=6, length=4, layers=[0, 1])
    a.start(0)
    k0 = a.k[0].detach().clone()
    assert torch.allclose(k0[0] @ k0[0].T, torch.eye(2), atol=1e-5)
    assert torch.equal(a.k[1], torch.zeros_like(a.k[1]))  # not initialised before its experience
    a.start(1)
    assert [p.requires_grad for p in a.k] == [False, True, False]
    past = [c[0].detach().clone() for c in (a.k, a.a, a.p)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        loss = model.backbone(x).pow(2).mean() + a.aux
        opt.zero_grad()
        loss.backward()
        assert all(c[0].grad is None for c in (a.k, a.a, a.p))
        assert a.k[1].grad.abs().sum() > 0 and a.p[1].grad.abs().sum() > 0
        opt.step()
    assert all(torch.equal(c[0], b) for c, b in zip((a.k, a.a, a.p), past, strict=True))
    assert torch.equal(a.k[2], torch.zeros_like(a.k[2]))


# ------------------------------------------------------------------ every method


METHODS = {
    "l2p": lambda: L2P(pool=4, top_n=2),
    "dualprompt": lambda: DualPrompt(g_layers=[0], e_layers=[1]),
    "coda_prompt": lambda: CODAPrompt(pool=10, length=4, layers=[0, 1], ortho=0.1),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_keeps_the_vit_bit_identical_and_trains_prompts_and_head(method):
    state = vit_state()
    component = METHODS[method]()
    from clrun.models import adapt_model

    vit_before = {k: v.clone() for k, v in state.model.backbone.state_dict().items()}
    for exp in state.benchmark.train_stream[:2]:
        exp = component.train_data(state, exp)
        component.pre_update(state, exp)
        assert state.reset_optimizer
        adapt_model(state.model, exp)
        prompts = peft.attachments(state.model)[method]
        before = {k: v.clone() for k, v in prompts.state_dict().items() if torch.is_tensor(v)}
        opt = torch.optim.SGD([p for p in state.model.parameters() if p.requires_grad], lr=0.05)
        state.model.train()
        for i in range(2):
            batch = exp.subset(torch.arange(i * 16, (i + 1) * 16))
            x = state.model_input(batch.x, batch.e, train=True)
            out = state.model(x, batch.t)
            loss = component.loss(state, batch, x, out)
            term = component.penalty(state, batch, x, out)
            assert term is not None and term.item() >= 0
            opt.zero_grad()
            (loss + term).backward()
            opt.step()
        after = prompts.state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before.items())
    vit_after = state.model.backbone.state_dict()
    assert vit_before.keys() == {k for k in vit_after if torch.is_tensor(vit_after[k])}
    assert all(torch.equal(vit_after[k], v) for k, v in vit_before.items())


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "coda_prompt"])
def test_methods_refuse_other_models_and_scenarios_in_one_line(run_debug, strategy):
    name = {"l2p": "L2P", "dualprompt": "DualPrompt", "coda_prompt": "CODA-Prompt"}[strategy]
    with pytest.raises(ConfigError, match=f"{name} needs a timm Vision Transformer") as e:
        run_debug(f"strategy={strategy}")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"{name} needs a timm Vision Transformer"):
        run_debug(f"strategy={strategy}", "model=resnet18_reduced")
    with pytest.raises(ConfigError, match=f"{name} is class-incremental only"):
        run_debug(f"strategy={strategy}", *TIMM_TINY, "benchmark.scenario=task")


def test_dualprompt_needs_an_e_prompt_per_experience(run_debug):
    with pytest.raises(ConfigError, match=r"strategy.pool=2: DualPrompt needs one E-prompt"):
        run_debug("strategy=dualprompt", *TIMM_TINY, "strategy.pool=2")


def test_prefix_attention_is_timm_attention_over_prefixed_keys_and_values():
    state = vit_state()
    attn = state.model.backbone.net.blocks[0].attn.eval()
    x = torch.randn(3, 7, attn.qkv.in_features)
    empty = x[:, :0]
    with torch.no_grad():
        assert torch.allclose(prefix_attention(attn, x, empty, empty), attn(x), atol=1e-6)
        # by hand: softmax over [prefix keys; own keys] of the scaled scores, per head
        pk, pv = torch.randn(3, 2, x.shape[2]), torch.randn(3, 2, x.shape[2])
        h, hd = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(x).reshape(3, 7, 3, h, hd).permute(2, 0, 3, 1, 4)
        k = torch.cat([pk.reshape(3, 2, h, hd).transpose(1, 2), k], 2)
        v = torch.cat([pv.reshape(3, 2, h, hd).transpose(1, 2), v], 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        hand = attn.proj((w @ v).transpose(1, 2).reshape(3, 7, h * hd))
        assert torch.allclose(prefix_attention(attn, x, pk, pv), hand, atol=1e-5)
