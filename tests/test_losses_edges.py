"""Edge cases and argument checks of the loss module: empty / single rows, zero soft labels, class-range edges."""

from __future__ import annotations

import pytest
import torch
from losses_helpers import LOSSES, loss_and_grads, make_case, original_head_loss, poison_empty, rel_error, run_loss

import uniter_fast.losses as losses

BACKENDS = ["reference", "chunked", "triton", "auto", "fast"]
TASKS = ["mlm", "mrfr", "mrc", "mrckl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
def test_zero_masked_rows_give_zero_loss_and_gradients(backend, task) -> None:
    case = make_case(task, [4, 6], 0, 16, 45, torch.float32)
    loss = run_loss(task, case, backend)
    assert loss.shape == () and loss.dtype == torch.float32 and float(loss.detach()) == 0.0
    for grad in torch.autograd.grad(loss, case.leaves()):
        assert torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("task", TASKS)
def test_one_masked_row(monkeypatch, backend, task) -> None:
    case = make_case(task, [5, 3, 4], 1, 24, 1601 if task != "mrfr" else 2048, torch.float32)
    want = loss_and_grads(original_head_loss(task, case), case.leaves())
    poison_empty(monkeypatch)
    got = loss_and_grads(run_loss(task, case, backend), case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_soft_labels_with_exact_zeros_and_one_hot(backend) -> None:
    case = make_case("mrckl", [9, 6], 8, 24, 1601, torch.float32)
    case.target[:3] = 0.0
    case.target[0, 1600] = 1.0  # one-hot at the last class
    case.target[1, 0] = 1.0  # one-hot on background
    case.target[2, 7] = 0.25  # mass < 1 (the original does not renormalise)
    assert (case.target == 0).float().mean() > 0.4
    got = loss_and_grads(run_loss("mrckl", case, backend), case.leaves())
    want = loss_and_grads(original_head_loss("mrckl", case), case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_mlm_labels_at_vocabulary_edges(backend) -> None:
    case = make_case("mlm", [6, 8], 6, 32, 28996, torch.float32)
    case.target[:] = torch.tensor([0, 28995, 0, 28995, 1, 28994])
    got = loss_and_grads(run_loss("mlm", case, backend), case.leaves())
    want = loss_and_grads(original_head_loss("mlm", case), case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_mrc_target_skips_background_and_reaches_both_edges(backend) -> None:
    case = make_case("mrc", [6, 5], 4, 16, 1601, torch.float32)
    case.target[:] = 0.0
    case.target[0, 0], case.target[0, 1] = 0.9, 0.1  # background largest: target must be class 1
    case.target[1, 1600] = 1.0  # last class
    case.target[2, 0], case.target[2, 1600] = 0.6, 0.4
    case.target[3, 1] = 1.0  # first foreground class
    hidden = case.seq_out[case.mask]
    logits = torch.nn.functional.linear(hidden.float(), case.weight, case.bias)
    targets = torch.tensor([1, 1600, 1600, 1])
    want = torch.nn.functional.cross_entropy(logits, targets)
    got = losses.mrc_loss(hidden, case.weight, case.bias, case.target, backend=backend)
    assert rel_error(got.detach(), want.detach()) < 1e-5


def test_backward_twice_is_refused() -> None:
    case = make_case("mlm", [5, 5], 4, 16, 40, torch.float32)
    loss = run_loss("mlm", case, "chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("task", TASKS)
def test_kept_gradients_allow_a_second_backward(backend, task) -> None:
    """Inside ``kept_gradients`` a backward (here: to the hidden rows only, as the shared clean pass of adversarial
    training runs it) leaves the stored gradients intact: a second, full backward then gives exactly the gradients of
    a single backward; after it they are released."""
    from uniter_fast.losses.fused_linear import kept_gradients

    case = make_case(task, [7, 4, 6], 6, 24, 97, torch.float32)
    want = loss_and_grads(run_loss(task, case, backend), case.leaves())
    hidden = case.leaves()[0]
    loss = run_loss(task, case, backend)
    with kept_gradients():
        (first,) = torch.autograd.grad(loss * 3.0, [hidden], retain_graph=True)
    torch.testing.assert_close(first, 3.0 * want[1], rtol=1e-6, atol=0)
    got = torch.autograd.grad(loss, case.leaves(), retain_graph=True)
    for g, w in zip(got, want[1:]):
        assert torch.equal(g.float(), w)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_auto_and_fast_pick_chunked_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert losses.resolve_backend("auto", cpu) == "chunked"
    assert losses.resolve_backend("fast", cpu) == "chunked"
    assert losses.resolve_backend("triton", cpu) == "triton"


def test_poisoning_catches_unwritten_outputs(monkeypatch) -> None:
    poison_empty(monkeypatch)
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()


def _args(task: str, rows: int = 3, hidden: int = 8, classes: int = 11) -> list[torch.Tensor]:
    weight = torch.randn(hidden, classes) if task == "mrfr" else torch.randn(classes, hidden)
    target = torch.randint(0, classes, (rows,)) if task == "mlm" else torch.rand(rows, classes)
    return [torch.randn(rows, hidden), weight, torch.randn(classes), target]


@pytest.mark.parametrize("task", TASKS)
def test_bad_shapes_name_the_argument(task) -> None:
    hidden, weight, bias, target = _args(task)
    with pytest.raises(ValueError, match="hidden"):
        LOSSES[task](hidden[None], weight, bias, target)
    with pytest.raises(ValueError, match="weight"):
        LOSSES[task](hidden, weight[:-1] if task == "mrfr" else weight[:, :-1], bias, target)
    with pytest.raises(ValueError, match="bias"):
        LOSSES[task](hidden, weight, bias[:-1], target)
    with pytest.raises(ValueError, match="labels" if task == "mlm" else "targets|soft_labels"):
        LOSSES[task](hidden, weight, bias, target[:-1])
    with pytest.raises(ValueError, match="device"):
        LOSSES[task](hidden, weight, bias, target.to("meta"))
    with pytest.raises(ValueError, match="weight must be on"):
        LOSSES[task](hidden, weight.to("meta"), bias, target)
    with pytest.raises(ValueError, match="backend"):
        LOSSES[task](hidden, weight, bias, target, backend="cuda")
    with pytest.raises(TypeError, match="hidden"):
        LOSSES[task](hidden.long(), weight, bias, target)


def test_mlm_labels_out_of_range_or_wrong_dtype() -> None:
    hidden, weight, bias, labels = _args("mlm")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\)"):
        losses.mlm_loss(hidden, weight, bias, torch.tensor([0, -1, 3]))
    with pytest.raises(ValueError, match="labels"):
        losses.mlm_loss(hidden, weight, bias, torch.tensor([0, 11, 3]))
    with pytest.raises(TypeError, match="labels"):
        losses.mlm_loss(hidden, weight, bias, labels.float())


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("task", TASKS)
def test_weighted_rows_average_the_real_rows_only(backend, task) -> None:
    """Padding rows of a fixed-shape batch (weight 0, random values, placed between real rows) change no loss and no
    gradient; bf16 too."""
    classes = 1601 if task != "mrfr" else 2048
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(task, [7, 5, 9], 9, 24, classes, dtype)
        hidden = case.seq_out[case.mask]
        rows = hidden.size(0)
        extra = make_case(task, [6], 4, 24, classes, dtype)  # 4 rows of random padding, with their own targets
        order = torch.randperm(rows + 4)
        padded = torch.cat([case.seq_out[case.mask], extra.seq_out[extra.mask].detach()])[order]
        target = torch.cat([case.target, extra.target])[order]
        weights = torch.cat([torch.ones(rows), torch.zeros(4)])[order]
        got = LOSSES[task](padded, case.weight, case.bias, target, backend=backend, weights=weights)
        want = LOSSES[task](hidden, case.weight, case.bias, case.target, backend=backend)
        for g, w in zip(loss_and_grads(got, case.leaves()), loss_and_grads(want, case.leaves())):
            assert rel_error(g, w) < (1e-6 if dtype == torch.float32 else 1e-2), (dtype, rel_error(g, w))


def test_weights_are_checked() -> None:
    case = make_case("mlm", [4, 6], 3, 16, 45, torch.float32)
    hidden = case.seq_out[case.mask]
    with pytest.raises(TypeError, match="weights must be a float32 tensor, got torch.int64"):
        losses.mlm_loss(hidden, case.weight, case.bias, case.target, weights=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights must have shape \[3\], got \[4\]"):
        losses.mrc_kl_loss(hidden, case.weight, case.bias, torch.rand(3, 45), weights=torch.ones(4))
