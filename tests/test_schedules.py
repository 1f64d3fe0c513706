"""Learning-rate schedules (config group lr_schedule): the rates against PyTorch's schedulers as
the papers' code steps them, the runner applying them per epoch of every experience, and clear
errors."""

import pytest
import torch

from clrun.schedules import CosineRestarts, StepDecay


def _torch_rates(make_scheduler, epochs: int, lr: float, by_hand=None) -> list[float]:
    """The rate of each epoch from a PyTorch scheduler stepped once an epoch; ``by_hand(epoch)``:
    the rate a paper's loop sets by hand at that epoch instead (None: the scheduler's)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler, rates = make_scheduler(opt), []
    for epoch in range(epochs):
        manual = by_hand(epoch) if by_hand else None
        if manual is not None:
            opt.param_groups[0]["lr"] = manual
        elif epoch > 0:
            opt.step()
            scheduler.step()
        rates.append(opt.param_groups[0]["lr"])
    return rates


def test_cosine_restarts_is_gdumbs_warm_up_then_sgdr():
    """GDumb's code: epoch 0 at 0.1·lr, epoch 1 at lr, then CosineAnnealingWarmRestarts(T_0=1,
    T_mult=2, eta_min) stepped once an epoch."""

    def warm_up(epoch):  # their loop sets the rate by hand for the first two epochs
        return {0: 0.005, 1: 0.05}.get(epoch)

    def sgdr(opt):
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, 1, 2, eta_min=0.0005)

    theirs = _torch_rates(sgdr, 128, 0.05, by_hand=warm_up)
    schedule = CosineRestarts(min_lr=0.0005, first_cycle=1, cycle_mult=2, warmup_epochs=1)
    ours = [schedule.lr(0.05, e) for e in range(128)]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert ours[:3] == pytest.approx([0.005, 0.05, 0.05]) and ours[-1] < 0.001  # ends annealed


def test_cosine_restarts_without_warm_up_is_pytorchs():
    def sgdr(opt):
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, 3, 2, eta_min=0.01)

    schedule = CosineRestarts(min_lr=0.01, first_cycle=3, cycle_mult=2)
    assert [schedule.lr(0.1, e) for e in range(30)] == pytest.approx(_torch_rates(sgdr, 30, 0.1))


def test_step_decay_is_multistep():
    def multistep(opt):
        return torch.optim.lr_scheduler.MultiStepLR(opt, [49, 63], gamma=0.2)

    schedule = StepDecay(milestones=[49, 63], gamma=0.2)
    assert [schedule.lr(2.0, e) for e in range(70)] == pytest.approx(
        _torch_rates(multistep, 70, 2.0)
    )


def test_the_runner_sets_the_rate_at_each_epoch_of_every_experience(run_debug):
    """Each experience starts again at the full rate and ends at the last epoch's; the last rate
    is the one the checkpointed optimiser holds, with the initial rate kept beside it."""
    summary, run_dir = run_debug(
        "lr_schedule=step",
        "lr_schedule.milestones=[1,2]",
        "lr_schedule.gamma=0.5",
        "strategy.epochs=3",
    )
    assert summary["status"] == "completed"
    (group,) = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["optimizer"][
        "param_groups"
    ]
    assert group["initial_lr"] == 0.001 and group["lr"] == pytest.approx(0.001 * 0.25)
    plain, _ = run_debug("strategy.epochs=3")
    assert plain["final_avg_acc"] != summary["final_avg_acc"]  # the schedule changed training


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: CosineRestarts(min_lr=-1),
            "lr_schedule.min_lr=-1 is not allowed: expected a finite number ≥ 0",
        ),
        (
            lambda: CosineRestarts(first_cycle=0),
            "lr_schedule.first_cycle=0 is not allowed: expected an integer ≥ 1",
        ),
        (
            lambda: CosineRestarts(warmup_factor=0),
            "lr_schedule.warmup_factor=0 is not allowed: expected a finite number > 0",
        ),
        (
            lambda: StepDecay(milestones=[5, 3]),
            "lr_schedule.milestones=[5, 3] is not allowed: expected increasing epochs",
        ),
        (
            lambda: StepDecay(gamma=float("nan")),
            "lr_schedule.gamma=nan is not allowed: expected a finite number > 0",
        ),
    ],
)
def test_bad_values_are_named(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make()
