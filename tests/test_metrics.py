import numpy as np
import pytest

from clrun import metrics

# R[i][j]: accuracy on experience j after training through experience i (3 experiences).
R = np.array(
    [
        [0.9, 0.1, 0.2],
        [0.6, 0.8, 0.3],
        [0.5, 0.7, 0.95],
    ]
)
B = np.array([0.1, 0.15, 0.25])  # untrained model


def test_final_average_accuracy():
    assert metrics.final_avg_acc(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_average_incremental_accuracy():
    expected = (0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.95) / 3) / 3
    assert metrics.avg_incremental_acc(R) == pytest.approx(expected)


def test_forgetting_uses_best_earlier_accuracy():
    # exp0: max(0.9, 0.6) - 0.5 = 0.4 ; exp1: max(0.8) - 0.7 = 0.1
    assert metrics.forgetting(R) == pytest.approx((0.4 + 0.1) / 2)


def test_backward_transfer():
    # exp0: 0.5 - 0.9 ; exp1: 0.7 - 0.8
    assert metrics.bwt(R) == pytest.approx((-0.4 - 0.1) / 2)


def test_forward_transfer():
    # exp1: R[0][1] - b1 = 0.1 - 0.15 ; exp2: R[1][2] - b2 = 0.3 - 0.25
    assert metrics.fwt(R, B) == pytest.approx((-0.05 + 0.05) / 2)


def test_single_experience_has_no_transfer_metrics():
    one = np.array([[0.7]])
    s = metrics.summarize(one, np.array([0.1]))
    assert s["final_avg_acc"] == pytest.approx(0.7)
    assert s["forgetting"] is None and s["bwt"] is None and s["fwt"] is None
