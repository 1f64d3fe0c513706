import torch
import torch.nn.functional as F

from clrun.benchmarks import Experience
from clrun.models import MASKED, IncrementalClassifier, MultiHeadClassifier, adapt_model, cnn, mlp


def exp(classes: list[int], task: int = 0, n: int = 8, index: int = 0) -> Experience:
    y = torch.tensor(classes).repeat(n // len(classes))
    x = torch.randint(0, 255, (len(y), 1, 6, 6), dtype=torch.uint8)
    return Experience(index, x, y, torch.full_like(y, task), torch.full_like(y, index))


def train_step(model, e: Experience, lr: float = 0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(e.x.float() / 255, e.t), e.y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_incremental_head_grows_keeps_old_weights_and_trains_new_ones():
    model = mlp((1, 6, 6), 10, head="incremental", hidden_sizes=[16])
    assert adapt_model(model, exp([0, 1]))
    head = model.head.units
    assert head.classes.tolist() == [0, 1]
    old_w = head.linear.weight.detach().clone()
    assert adapt_model(model, exp([2, 3], index=1))
    assert not adapt_model(model, exp([2, 3], index=1))  # nothing new: no growth
    assert head.classes.tolist() == [0, 1, 2, 3]
    assert torch.equal(head.linear.weight[:2], old_w)
    before = head.linear.weight.detach().clone()
    train_step(model, exp([2, 3], index=1))
    assert not torch.equal(head.linear.weight[2:], before[2:])  # the new units are trained
    out = model(torch.rand(4, 1, 6, 6))
    assert out.shape == (4, 10) and torch.all(out[:, 4:] == MASKED)


def test_multi_head_routes_each_sample_by_task_label():
    torch.manual_seed(0)
    model = mlp((1, 6, 6), 4, head="multi", hidden_sizes=[16])
    adapt_model(model, exp([0, 1], task=0))
    adapt_model(model, exp([2, 3], task=1, index=1))
    assert len(model.head.heads) == 2
    x = torch.rand(6, 1, 6, 6)
    t = torch.tensor([0, 1, 0, 1, 1, 0])
    out = model(x, t)
    feats = model.backbone(x)
    for i in range(6):
        expected = model.head.heads[int(t[i])](feats[i : i + 1], 4)[0]
        assert torch.allclose(out[i], expected)
    assert torch.all(out[t == 0][:, 2:] == MASKED) and torch.all(out[t == 1][:, :2] == MASKED)
    # a task without a head (a future task at evaluation) gets all-masked logits
    assert torch.all(model(x[:2], torch.tensor([5, 2])) == MASKED)


def test_multi_head_training_one_task_leaves_other_heads_untouched():
    model = mlp((1, 6, 6), 4, head="multi", hidden_sizes=[16])
    adapt_model(model, exp([0, 1], task=0))
    adapt_model(model, exp([2, 3], task=1, index=1))
    h0 = [p.detach().clone() for p in model.head.heads[0].parameters()]
    train_step(model, exp([2, 3], task=1, index=1))
    assert all(torch.equal(a, b) for a, b in zip(h0, model.head.heads[0].parameters(), strict=True))


def test_grown_models_load_into_fresh_ones():
    for head in ("incremental", "multi"):
        a = mlp((1, 6, 6), 10, head=head, hidden_sizes=[8])
        adapt_model(a, exp([0, 1], task=0))
        adapt_model(a, exp([4, 5], task=1, index=1))
        b = mlp((1, 6, 6), 10, head=head, hidden_sizes=[8])
        b.load_state_dict(a.state_dict())
        x, t = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 1])
        assert torch.equal(a(x, t), b(x, t))


def test_nested_dynamic_heads_are_adapted():
    inner = IncrementalClassifier(4, 5)
    wrapper = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(inner))
    assert adapt_model(wrapper, exp([1, 3]))
    assert inner.units.classes.tolist() == [1, 3]
    assert isinstance(MultiHeadClassifier(4, 5), torch.nn.Module)


def test_cnn_forward_backward_with_every_head():
    for head in ("single", "incremental", "multi"):
        model = cnn((1, 6, 6), 4, head=head, channels=[4, 8])
        e = exp([0, 1], task=0)
        adapt_model(model, e)
        train_step(model, e)
        assert model(torch.rand(2, 1, 6, 6), torch.zeros(2, dtype=torch.long)).shape == (2, 4)
