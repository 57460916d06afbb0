"""diagonal_fisher against a brute-force oracle: a Python loop over examples and classes that
backpropagates each log-probability separately (float64), written here from the definitions."""

import pytest
import torch
from torch import nn

from meanwise.merging import diagonal_fisher

RTOL = 1e-6


def oracle(model, inputs, targets, mode, likelihood="categorical"):
    """mean_n Σ_terms w (∂ objective/∂θ)², one autograd call per example and class."""
    model.eval()
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(inputs.shape[0]):
        out = model(inputs[n : n + 1])[0]
        if likelihood == "categorical":
            log_p = torch.log_softmax(out, -1)
            p = log_p.exp().detach()
            if mode == "exact":
                terms = [(p[c], log_p[c]) for c in range(len(p))]
            else:
                terms = [(1.0, log_p[targets[n]])]
        else:
            out = out.reshape(-1)
            if mode == "exact":  # E_y (y - f)² = 1 per output coordinate
                terms = [(1.0, out[d]) for d in range(len(out))]
            else:
                terms = [(1.0, -0.5 * (out - targets[n].reshape(-1)).square().sum())]
        for weight, objective in terms:
            grads = torch.autograd.grad(
                objective, list(params.values()), retain_graph=True, materialize_grads=True
            )
            for name, g in zip(params, grads, strict=True):
                fisher[name] += weight * g.square()
    return {k: v / inputs.shape[0] for k, v in fisher.items()}


def assert_close(ours, expected):
    assert ours.keys() == expected.keys()
    for key in expected:
        scale = expected[key].abs().max()
        assert scale > 0, f"{key}: the oracle Fisher is zero; the test would test nothing"
        err = (ours[key] - expected[key]).abs().max() / scale
        assert err < RTOL, f"{key}: relative error {err:.2e}"


class SequenceModel(nn.Module):
    """Embedding (fallback), a Linear over positions (weight sharing), LayerNorm, a free
    parameter used in forward (fallback) and a head called twice (summed before squaring)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        h = torch.tanh(self.norm(self.proj(self.embed(tokens)))) * self.scale
        return self.head(h.mean(1)) + self.head(h[:, 0])


class ConvModel(nn.Module):
    """Strided, dilated, grouped convolutions, eval-mode BatchNorm and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv1d(6, 3, 2)
        self.c4 = nn.Conv2d(2, 2, 3, padding="same", bias=False)  # fallback: string padding
        self.fc = nn.Linear(3, 3)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = x + 0.1 * self.c4(x)
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h)).mean(2)
        return self.fc(torch.tanh(self.c3(h)).mean(-1))


class TiedModel(nn.Module):
    """A Linear whose weight is also used by another Linear: the general path must take it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(5, 5, bias=False)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def _mlp():
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(7, 7), nn.Tanh(),
        nn.Linear(7, 3),
    )  # fmt: skip


CASES = {
    "mlp": (_mlp, lambda g: torch.randn(13, 5, generator=g, dtype=torch.float64), 3),
    "sequence": (SequenceModel, lambda g: torch.randint(0, 7, (9, 5), generator=g), 4),
    "conv": (ConvModel, lambda g: torch.randn(7, 2, 8, 8, generator=g, dtype=torch.float64), 3),
    "tied": (TiedModel, lambda g: torch.randn(9, 5, generator=g, dtype=torch.float64), 3),
}


@pytest.mark.parametrize("mode", ["exact", "empirical"])
@pytest.mark.parametrize("case", list(CASES))
def test_categorical_matches_per_example_per_class_loop(case, mode):
    make, make_inputs, classes = CASES[case]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make().double()
    inputs = make_inputs(g)
    targets = torch.randint(0, classes, (inputs.shape[0],), generator=g)
    # several batches, and chunks smaller than a batch, so accumulation across both is tested
    batches = [(inputs[:6], targets[:6]), (inputs[6:], targets[6:])]
    ours = diagonal_fisher(model, batches, mode=mode, chunk_size=4)
    assert_close(ours, oracle(model, inputs, targets, mode))


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_gaussian_matches_loop(mode):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs = torch.randn(11, 4, dtype=torch.float64)
    targets = torch.randn(11, 2, dtype=torch.float64)
    ours = diagonal_fisher(model, [(inputs, targets)], mode=mode, likelihood="gaussian")
    assert_close(ours, oracle(model, inputs, targets, mode, "gaussian"))


def test_gaussian_scalar_output_accepts_flat_targets():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).double()
    inputs, targets = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    ours = diagonal_fisher(model, [(inputs, targets)], mode="empirical", likelihood="gaussian")
    inner = model[:3]
    assert_close(ours, oracle(inner, inputs, targets.unsqueeze(1), "empirical", "gaussian"))


def test_sampled_converges_to_exact():
    """E_{y~p}[(∂ log p_y)²] is the exact Fisher: many draws land within a few percent."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    exact = diagonal_fisher(model, [inputs], mode="exact")
    sampled = diagonal_fisher(
        model, [inputs], mode="sampled", n_samples=4000, generator=torch.Generator().manual_seed(0)
    )
    for key in exact:
        rel = (sampled[key] - exact[key]).norm() / exact[key].norm()
        assert rel < 0.05, f"{key}: {rel:.3f}"
    one = diagonal_fisher(model, [inputs], mode="sampled", generator=torch.Generator())
    assert any(not torch.allclose(one[k], exact[k], rtol=1e-3) for k in exact)


def test_sampled_matches_loop_over_the_same_draws():
    """With the same generator the labels are drawn as torch.multinomial(p, S) per chunk; the
    loop over those labels (each draw weighted 1/S) must give the same Fisher."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(10, 4, dtype=torch.float64)
    draws = 3
    ours = diagonal_fisher(
        model, [inputs], mode="sampled", n_samples=draws, generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        probs = torch.softmax(model(inputs), -1).float()
    labels = torch.multinomial(
        probs, draws, replacement=True, generator=torch.Generator().manual_seed(7)
    )
    expected = {k: torch.zeros_like(v) for k, v in ours.items()}
    for s in range(draws):
        one = oracle(model, inputs, labels[:, s], "empirical")
        for k in expected:
            expected[k] += one[k] / draws
    assert_close(ours, expected)


def test_max_examples_params_and_model_state_restored():
    torch.manual_seed(4)
    model = _mlp().double().train()
    model[0].weight.requires_grad_(False)
    inputs = torch.randn(20, 5, dtype=torch.float64)
    ours = diagonal_fisher(model, [inputs[:7], inputs[7:]], max_examples=9, params=["3.weight"])
    assert list(ours) == ["3.weight"]
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad
    full = oracle(model, inputs[:9], None, "exact")  # (the oracle switches to eval mode)
    assert_close(ours, {"3.weight": full["3.weight"]})
    default = diagonal_fisher(model, [inputs[:3]])
    assert "0.weight" not in default and "3.weight" in default  # frozen params skipped


def test_float32_model_gives_float32_fisher_close_to_float64():
    torch.manual_seed(5)
    model = _mlp()
    inputs = torch.randn(16, 5)
    ours = diagonal_fisher(model, [inputs])
    reference = oracle(model.double(), inputs.double(), None, "exact")
    for key, value in ours.items():
        assert value.dtype == torch.float32
        assert (value.double() - reference[key]).abs().max() / reference[key].abs().max() < 1e-4


def test_errors_name_the_argument():
    model = _mlp()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="mode must be one of"):
        diagonal_fisher(model, [x], mode="true")
    with pytest.raises(ValueError, match="likelihood"):
        diagonal_fisher(model, [x], likelihood="poisson")
    with pytest.raises(ValueError, match="needs targets"):
        diagonal_fisher(model, [x], mode="empirical")
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        diagonal_fisher(model, [(x, torch.tensor([0, 1, 2, 3]))], mode="empirical")
    with pytest.raises(TypeError, match="integer class indices"):
        diagonal_fisher(model, [(x, torch.zeros(4))], mode="empirical")
    with pytest.raises(ValueError, match="not parameters of the model"):
        diagonal_fisher(model, [x], params=["nope"])
    with pytest.raises(ValueError, match="no examples"):
        diagonal_fisher(model, [])
    with pytest.raises(ValueError, match="n_samples"):
        diagonal_fisher(model, [x], mode="sampled", n_samples=0)
    with pytest.raises(ValueError, match=r"output must be \[N, C\]"):
        diagonal_fisher(nn.Sequential(nn.Linear(5, 3), nn.Flatten(0)), [x])
    with pytest.raises(TypeError, match="batch 0"):
        diagonal_fisher(model, [3])


def test_batchnorm_with_batch_statistics_is_refused():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="batch statistics"):
        diagonal_fisher(model, [torch.randn(8, 5)], eval_mode=False)
    diagonal_fisher(model, [torch.randn(8, 5)])  # eval mode: running statistics, fine
