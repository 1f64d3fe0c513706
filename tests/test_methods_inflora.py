"""InfLoRA (clrun.strategies.InfLoRA) and the ``lora`` kind (clrun.models.lora): the
construction of the subspace by hand on toys, the orthogonality of a new branch to the stored
subspace, old branches and frozen weights untouched, restoring on a fresh model, refusals
(SIGKILL-and-resume: tests/test_resume.py runs every strategy, this one included)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg, strategy_args, vit_state
from test_methods_peft import grow, snapshot

from clrun.config import ConfigError, build, build_model
from clrun.models import peft
from clrun.models.lora import input_covariance
from clrun.strategies import InfLoRA
from clrun.strategies.inflora import design_down, update_subspace

timm = pytest.importorskip("timm")

E = torch.eye(4, dtype=torch.float64)


def spans(basis: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether the columns of ``basis`` span exactly the columns of ``expected`` (projectors)."""
    return torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-12)


# ------------------------------------------------------------------ DualGPM by hand


def test_first_subspace_keeps_the_directions_holding_the_threshold_energy():
    # covariance diag(16, 9, 4, 1): squared singular values 256, 81, 16, 1 (total 354), cumulative
    # ratios 0.723, 0.952, 0.997, 1: below 0.95 one → P = e1; below 0.96 two → k = 2 is half the
    # dimension, so the complement Q = [e3, e4] is kept (retain-representation)
    cov = torch.diag(torch.tensor([16.0, 9, 4, 1], dtype=torch.float64))
    basis, retain = update_subspace(cov, None, False, 0.95)
    assert not retain and spans(basis, E[:, :1])
    basis, retain = update_subspace(cov, None, False, 0.96)
    assert retain and spans(basis, E[:, 2:])
    # below 0.5 none: still one direction (their max(r, 1))
    basis, retain = update_subspace(cov, None, False, 0.5)
    assert not retain and spans(basis, E[:, :1])


def test_later_subspace_adds_the_new_directions_until_the_threshold():
    # P = e1; new covariance diag(0, 1, 100, 0): the old subspace holds none of its energy
    # (1 + 10000 over 10001), its top projected direction e3 holds 10000/10001 ≥ 0.95 → P = [e1, e3]
    p = E[:, :1]
    cov = torch.diag(torch.tensor([0.0, 1, 100, 0], dtype=torch.float64))
    basis, retain = update_subspace(cov, p, False, 0.95)
    assert not retain and spans(basis, E[:, [0, 2]])
    # the old subspace already holds ≥ threshold of the new energy: nothing added
    cov = torch.diag(torch.tensor([100.0, 1, 0, 0], dtype=torch.float64))
    basis, retain = update_subspace(cov, p, False, 0.95)
    assert not retain and spans(basis, p)
    # P = [e1, e3] + e2 passes half the dimension: the complement e4 is kept instead
    cov = torch.diag(torch.tensor([0.0, 100, 0, 0], dtype=torch.float64))
    basis, retain = update_subspace(cov, E[:, [0, 2]], False, 0.95)
    assert retain and spans(basis, E[:, 3:])


def test_retain_representation_gives_up_free_directions():
    # Q = [e3, e4] free; the new inputs live on e4 (all energy free, ≥ 1 − 0.96): e4 leaves Q;
    # then the free energy is 0 < 0.04 and e3 stays
    cov = torch.diag(torch.tensor([0.0, 0, 0, 5], dtype=torch.float64))
    basis, retain = update_subspace(cov, E[:, 2:], True, 0.96)
    assert retain and spans(basis, E[:, 2:3])


def test_designed_down_is_orthogonal_to_the_stored_subspace_in_both_representations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    cov = x.T @ x
    p = torch.linalg.qr(torch.randn(16, 5, generator=g, dtype=torch.float64))[0]
    down = design_down(cov, p, False, 3)
    assert down.shape == (3, 16)
    assert (down @ p).abs().max() < 1e-12  # B_t P = 0: ΔW_t = A_t B_t vanishes on span(P)
    # rows orthonormal up to the authors' 1/√3, and the top directions of (I − PPᵀ) C
    assert torch.allclose(down @ down.T * 3, torch.eye(3, dtype=torch.float64), atol=1e-12)
    u = torch.linalg.svd(cov - p @ p.T @ cov)[0][:, :3]
    assert spans(down.T * math.sqrt(3), u)
    # the same subspace held as its complement Q gives the same B (up to signs)
    q = torch.linalg.svd(p)[0][:, 5:]
    other = design_down(cov, q, True, 3)
    assert torch.allclose((other.T @ other), (down.T @ down), atol=1e-12)
    # no subspace yet: the covariance's own top directions
    first = design_down(cov, None, False, 3) * math.sqrt(3)
    assert spans(first.T, torch.linalg.svd(cov)[0][:, :3])


# ------------------------------------------------------------------ the lora kind


def test_lora_adds_its_update_to_k_and_v_only():
    model = vit_state().model.eval()
    vit = model.backbone.net
    qkv = vit.blocks[0].attn.qkv
    x = torch.randn(2, 5, qkv.in_features)
    plain = qkv(x)
    a = peft.attach(model, "lora", "l", rank=2, targets="kv", fixed_down=True)
    assert [n for n, _ in a.named_parameters()] == ["up"]  # down is a buffer: never trained
    with torch.no_grad():
        a.down.normal_()
        a.up.normal_()
    out = qkv(x)
    d = qkv.in_features
    assert torch.equal(out[..., :d], plain[..., :d])  # q unchanged
    for j, s in enumerate((1, 2)):
        expected = plain[..., s * d : (s + 1) * d] + x @ a.delta(0)[j].T
        assert torch.allclose(out[..., s * d : (s + 1) * d], expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="lora targets='kx'"):
        peft.attach(model, "lora", "bad", targets="kx")


def test_input_covariance_is_the_sum_over_tokens_of_the_qkv_inputs():
    model = vit_state().model.eval()
    vit = model.backbone.net
    x = torch.randn(3, 3, 16, 16)
    seen = []
    h = vit.blocks[1].attn.qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    covs = input_covariance(vit, lambda: model.backbone(x))
    h.remove()
    tokens = seen[0].reshape(-1, seen[0].shape[-1]).double()
    assert len(covs) == 2 and torch.allclose(covs[1], tokens.T @ tokens, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ the method


def setup(*overrides: str):
    state = vit_state(*overrides)
    return state, InfLoRA(rank=4)


def first_experience(state, method):
    exp = state.benchmark.train_stream[0]
    method.train_data(state, exp)
    method.pre_update(state, exp)
    grow(state, exp)
    params = [p for p in state.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    for i in range(3):
        batch = exp.subset(torch.arange(i * 32, (i + 1) * 32))
        out = state.model(state.model_input(batch.x, batch.e, train=True), batch.t)
        loss = method.loss(state, batch, None, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.post_update(state, exp)
    return exp


def test_new_branch_is_orthogonal_to_the_stored_input_subspace():
    """ΔW_1 P ≈ 0 for the basis P of experience 0's inputs, whatever A_1 learns; the new
    branch changes nothing on inputs inside that subspace."""
    state, method = setup()
    first_experience(state, method)
    exp = state.benchmark.train_stream[1]
    method.train_data(state, exp)
    method.pre_update(state, exp)
    branch = peft.attachments(state.model)["inflora1"]
    assert branch.up.requires_grad and not peft.attachments(state.model)["inflora0"].trainable
    with torch.no_grad():
        branch.up.normal_()  # any A_1
    for i, (basis, retain) in enumerate(zip(method.bases, method.retain, strict=True)):
        old = torch.linalg.svd(basis)[0][:, basis.shape[1] :] if retain else basis
        for j in range(2):  # k and v
            delta = branch.delta(i)[j].double()
            # float32 B_t (entries ≤ 1/√3), A_1 ~ N(0, 1): |ΔW P| is rounding, ≤ 1e-5
            assert (delta @ old).abs().max() < 1e-5, (i, j)
            assert (delta @ torch.linalg.svd(old)[0][:, old.shape[1] :]).abs().max() > 1e-2


def test_subspace_after_two_experiences_is_the_dualgpm_construction():
    """The stored basis after experience 1 is update_subspace applied to the covariances the
    model's passes give (those passes checked above), at the thresholds 0.95 + 0.05 t / T."""
    state, method = setup()
    first_experience(state, method)
    assert method.threshold(state, 0) == 0.95
    n = len(state.benchmark.train_stream)
    assert method.threshold(state, 1) == pytest.approx(0.95 + 0.05 / n)
    bases0 = [b.clone() for b in method.bases]
    retain0 = list(method.retain)
    exp = state.benchmark.train_stream[1]
    method.train_data(state, exp)
    method.pre_update(state, exp)
    grow(state, exp)
    gen = state.benchmark.generator.get_state()  # the same augmentation draws (if any) twice
    cov = method.covariance(state, exp)  # what post_update measures (no training between)
    state.benchmark.generator.set_state(gen)
    method.post_update(state, exp)
    for i in range(len(cov)):
        basis, retain = update_subspace(cov[i], bases0[i], retain0[i], method.threshold(state, 1))
        assert retain == method.retain[i]
        assert torch.allclose(basis @ basis.T, method.bases[i] @ method.bases[i].T, atol=1e-8)


def test_old_branches_head_units_and_the_vit_stay_as_they_were(run_debug):
    """End to end: inflora0 (B and A), the units of experience 0's classes and every weight of
    the pre-trained ViT after the last experience are bit for bit what they were."""
    from clrun import checkpoint

    summary, run_dir = run_debug(*strategy_args("inflora"), "checkpoint.keep=every_experience")
    assert summary["status"] == "completed"

    def load(path):
        return torch.load(path, weights_only=True)["model"]

    first = load(checkpoint.model_file(run_dir, 0))
    last = load(run_dir / checkpoint.FILE)
    n = len(summary["params_per_experience"])
    assert {k.split(".")[1] for k in last if k.startswith("peft.")} == {
        f"inflora{i}" for i in range(n)
    }
    branch = {k for k in first if k.startswith("peft.inflora0.") and "extra" not in k}
    assert branch == {"peft.inflora0.down", "peft.inflora0.up"}
    assert first["peft.inflora0.up"].abs().sum() > 0  # it trained
    for key in branch:
        assert torch.equal(last[key], first[key]), key
    n0 = len(first["head.units.classes"])
    assert torch.equal(last["head.units.classes"][:n0], first["head.units.classes"])
    for key in ("head.units.linear.weight", "head.units.linear.bias"):
        assert torch.equal(last[key][:n0], first[key]), key
    # the ViT as the run built it (same seed): unchanged
    cfg = make_cfg("debug=default", *strategy_args("inflora"))
    torch.manual_seed(cfg.seed)
    built = build_model(cfg, build(cfg.benchmark, "benchmark"), torch.device("cpu"))
    vit = snapshot(built, "backbone.net.")
    assert vit and all(torch.equal(last[k], v) for k, v in vit.items())


def test_state_round_trips_and_restores_the_branches_on_a_fresh_model():
    from conftest import round_trip

    state, method = setup()
    first_experience(state, method)
    other = InfLoRA(rank=4)
    other.load_state_dict(round_trip(method))
    assert other.retain == method.retain
    assert all(torch.equal(a, b) for a, b in zip(other.bases, method.bases, strict=True))
    fresh = vit_state().model  # no head units, no attachment: both come from the state dict
    fresh.load_state_dict(state.model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh.eval()(x, None), state.model.eval()(x, None))
    assert not fresh.peft["inflora0"].trainable


def test_refuses_models_without_a_vit_and_other_scenarios(run_debug):
    with pytest.raises(ConfigError, match="InfLoRA needs a timm Vision Transformer") as e:
        run_debug("strategy=inflora")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="benchmark.scenario=domain is not supported"):
        run_debug(*strategy_args("inflora"), "benchmark.scenario=domain")


def test_task_incremental_runs(run_debug):
    summary, _ = run_debug(*strategy_args("inflora"), "benchmark.scenario=task", "model.head=multi")
    assert summary["status"] == "completed" and summary["task_final_avg_acc"] > 0.6


def test_loss_is_cross_entropy_over_the_experience_classes():
    state, method = setup()
    exp = state.benchmark.train_stream[1]
    method.train_data(state, exp)
    out = torch.randn(5, state.benchmark.n_classes)
    y = torch.tensor(exp.classes)[torch.tensor([0, 1, 0, 1, 1]) % len(exp.classes)]
    pos = torch.tensor([exp.classes.index(c) for c in y.tolist()])
    expected = F.cross_entropy(out[:, exp.classes], pos)
    assert torch.allclose(method.loss(state, SimpleNamespace(y=y), None, out), expected)


def test_coda_cosine_is_the_authors_schedule():
    from clrun.schedules import CodaCosine

    s = CodaCosine(epochs=20)
    assert s.lr(0.0005, 0) == 0.0005
    assert s.lr(0.0005, 19) == pytest.approx(0.0005 * math.cos(0.495 * math.pi))  # ≈ 0.0157 lr
    assert s.lr(1.0, 10) == pytest.approx(math.cos(99 * math.pi * 10 / (200 * 19)))
    assert CodaCosine(epochs=1).lr(0.1, 0) == 0.1
    cfg = make_cfg("strategy=inflora", "lr_schedule=coda_cosine", "strategy.epochs=7")
    assert cfg.lr_schedule.epochs == 7  # follows the strategy's epochs


@pytest.mark.parametrize(
    ("preset", "epochs", "threshold"), [("cifar_inflora", 20, 0.95), ("inr_inflora", 50, 0.98)]
)
def test_liang2024_presets_carry_the_authors_settings(preset, epochs, threshold):
    cfg = make_cfg(f"experiment=liang2024/{preset}")
    assert cfg.strategy.components.inflora._target_ == "clrun.strategies.InfLoRA"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.0005
    assert cfg.optimizer.weight_decay == 0 and cfg.strategy.batch_size == 128
    assert cfg.lr_schedule._target_ == "clrun.schedules.CodaCosine"
    assert cfg.lr_schedule.epochs == cfg.strategy.epochs == epochs
    assert cfg.strategy.rank == 10 and cfg.strategy.threshold_first == threshold
    assert cfg.strategy.threshold_last == 1.0 and cfg.benchmark.n_experiences == 10
    order = cfg.benchmark.class_order
    assert order == "sorted" if preset.startswith("inr") else list(order) == list(range(100))
