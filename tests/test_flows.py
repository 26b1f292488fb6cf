"""Property tests of every flow, in float64 (zuko's tests/test_flows.py is the model)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.func import jacrev, vmap

from fce.flows import MAF, Glow, Spline
from fce.flows.base import standard_normal_log_prob
from fce.flows.glow import AffineCoupling
from fce.flows.spline import RQSplineCoupling
from tests.helpers import flow_classes

FLOWS = flow_classes()

SMALL = {
    "glow": dict(n_steps=3, width=16),
    "maf": dict(n_blocks=3, hidden=16),
    "spline": dict(n_layers=3, bins=6, hidden=16),
}


def make_flow(name: str, small: bool = True, dim: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    flow = FLOWS[name](**(SMALL[name] if small else {}), dim=dim).double()
    # Data-dependent init on a non-standard batch, then perturb every parameter so no test
    # passes by an identity or zero-initialised layer.
    flow.data_init(1.5 * torch.randn(512, dim, dtype=torch.float64) + 0.3)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


# Every flow in 2-D (the six datasets) and above it (their products, dataset.dim).
DIMS = (2, 4, 16)


@pytest.fixture(params=[(name, d) for name in sorted(FLOWS) for d in DIMS], ids=str)
def flow(request):
    return make_flow(*request.param[:1], dim=request.param[1])


@pytest.fixture(params=sorted(FLOWS))
def flow2d(request):
    return make_flow(request.param)


def points(n: int = 64, dim: int = 2) -> torch.Tensor:
    return 2 * torch.randn(n, dim, dtype=torch.float64)


def test_reference_parameter_counts():
    assert sum(p.numel() for p in Glow().parameters()) == 46_840
    assert sum(p.numel() for p in MAF().parameters()) == 54_020
    assert sum(p.numel() for p in Spline().parameters()) == 23_132  # conf/flow/spline.yaml


def test_inverse_of_forward_is_identity(flow):
    x = points(dim=flow.dim)
    z, log_det = flow(x)
    x_back, log_det_back = flow.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        log_det + log_det_back, torch.zeros_like(log_det), atol=1e-10, rtol=0
    )


def test_forward_of_inverse_is_identity(flow):
    z = torch.randn(64, flow.dim, dtype=torch.float64)
    x, _ = flow.inverse(z)
    torch.testing.assert_close(flow(x)[0], z, atol=1e-10, rtol=1e-10)


# vmap runs torch.searchsorted (the spline's bin lookup) on views it reports non-contiguous.
VMAP_SEARCHSORTED = pytest.mark.filterwarnings("ignore:torch.searchsorted")


@VMAP_SEARCHSORTED
def test_log_det_equals_autograd_jacobian(flow):
    x = points(16, flow.dim)
    jac = vmap(jacrev(lambda row: flow(row[None])[0][0]))(x)
    _, log_det = flow(x)
    torch.testing.assert_close(
        log_det, torch.linalg.slogdet(jac).logabsdet, atol=1e-10, rtol=1e-10
    )
    z = torch.randn(16, flow.dim, dtype=torch.float64)
    jac_inv = vmap(jacrev(lambda row: flow.inverse(row[None])[0][0]))(z)
    _, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(
        log_det_inv, torch.linalg.slogdet(jac_inv).logabsdet, atol=1e-10, rtol=1e-10
    )


def test_sample_log_prob_equals_log_prob_of_the_sample(flow):
    x, log_q = flow.sample_and_log_prob(128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-10, rtol=1e-10)


def test_log_prob_is_a_density(flow2d):
    # Integrates to ~1 over a wide grid (samples stay within it for these small flows); in
    # 2-D, where a grid can check it.
    flow = flow2d
    cells, limit = 400, 12.0
    width = 2 * limit / cells
    axis = -limit + width * (torch.arange(cells, dtype=torch.float64) + 0.5)
    with torch.no_grad():
        mass = flow.log_prob(torch.cartesian_prod(axis, axis)).exp().sum() * width**2
    assert mass.item() == pytest.approx(1.0, abs=2e-2)


def test_gradients_reach_every_parameter_through_samples_and_log_prob(flow):
    x, log_q = flow.sample_and_log_prob(64)
    loss = log_q.mean() + x.pow(2).mean() + flow.log_prob(points(dim=flow.dim)).mean()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_state_dict_round_trip(flow):
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other = FLOWS[flow.name](**SMALL[flow.name], dim=flow.dim).double()
    other.load_state_dict(torch.load(buffer))
    x = points(dim=flow.dim)
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x), atol=0, rtol=0)


def test_base_log_prob_is_standard_normal():
    z = torch.randn(10, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(standard_normal_log_prob(z), expected)


def test_glow_actnorm_data_init_standardises_the_first_batch():
    torch.manual_seed(0)
    flow = Glow(n_steps=1, width=8).double()
    x = 3 * torch.randn(4096, 2, dtype=torch.float64) + torch.tensor([1.0, -2.0])
    flow.data_init(x)
    actnorm = flow.transforms[0]
    y, _ = actnorm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    # ActNorm adds 1e-6 to the std so that a constant feature cannot divide by zero.
    torch.testing.assert_close(
        y.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert not actnorm.init_pending


def test_maf_is_autoregressive_in_alternating_orders():
    flow = make_flow("maf")
    x = points(4)
    for k, block in enumerate(flow.transforms):
        jac = vmap(jacrev(lambda row, b=block: b(row[None])[0][0]))(x)
        # Block 0 has order (0, 1): u_0 depends on x_0 only. Block 1 the reverse.
        first, second = (0, 1) if k % 2 == 0 else (1, 0)
        assert torch.all(jac[:, first, second] == 0)
        assert torch.all(jac[:, second, first] != 0)


def test_maf_log_scale_is_bounded():
    flow = MAF(n_blocks=1, hidden=8, scale_bound=2.0).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1e3)
    _, log_det = flow(points(256))
    assert log_det.abs().max() <= 2 * 2.0 + 1e-9


@pytest.mark.parametrize("bound", [10.0, math.inf])
def test_glow_log_scale_floor_keeps_far_samples_finite(bound):
    # A conditioner extrapolating to a huge negative raw scale: sigmoid underflows to 0.
    coupling = AffineCoupling(width=4, hidden_layers=1, scale_bound=bound)
    with torch.no_grad():
        coupling.out.bias.copy_(torch.tensor([0.0, -400.0]))
    z = torch.tensor([[1.0, 0.5], [-2.0, 3.0]])
    x, log_det = coupling.inverse(z)
    if math.isinf(bound):  # Glow without the floor divides by zero
        assert not torch.isfinite(x).all()
        return
    assert torch.isfinite(x).all()
    torch.testing.assert_close(log_det, torch.full((2,), bound))
    torch.testing.assert_close(x[:, 0], z[:, 0] * math.exp(bound))
    back, _ = coupling(x)
    torch.testing.assert_close(back, z)


def assert_frozen_and_folded_match(flow: torch.nn.Module) -> None:
    """``frozen()`` and ``folded()`` give the flow's own values, and ``folded()`` its gradients."""
    x, z = points(dim=flow.dim), torch.randn(64, flow.dim, dtype=torch.float64)
    z_before = z.clone()
    log_q = flow.log_prob(x)
    samples, log_q_samples = flow.transform_noise(z)
    close = dict(rtol=1e-10, atol=1e-10)

    frozen = flow.frozen()
    frozen_outputs = (frozen.log_prob(x), *frozen.transform_noise(z))
    for got, expected in zip(frozen_outputs, (log_q, samples, log_q_samples), strict=True):
        torch.testing.assert_close(got, expected.detach(), **close)
        assert not got.requires_grad
    assert torch.equal(z, z_before)  # the frozen passes work in place, but not on their input

    # A loss through both passes, as in a flow step: same value, same gradient everywhere.
    def loss(passes) -> torch.Tensor:
        x_noise, log_q_noise = passes.transform_noise(z)
        return passes.log_prob(x).mean() + (x_noise.pow(2).sum(1) * log_q_noise).mean()

    params = list(flow.parameters())
    expected_grads = torch.autograd.grad(loss(flow), params)
    folded_grads = torch.autograd.grad(loss(flow.folded()), params)
    for p, got, expected in zip(params, folded_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10, msg=str(p.shape))


def test_frozen_and_folded_flow_equal_the_flow(flow):
    assert_frozen_and_folded_match(flow)


@pytest.mark.parametrize("hidden_layers", [1, 3])
@pytest.mark.parametrize("bound", [2.0, math.inf])
def test_frozen_and_folded_glow_equal_glow_in_every_shape(hidden_layers, bound):
    # Glow folds each step into plain tensors: check every branch of that folding, with a
    # floor that binds (bound 2 under parameters perturbed by 0.1) and without one, and
    # both LU permutations (the identity and the swap).
    torch.manual_seed(1)
    flow = Glow(n_steps=6, width=8, hidden_layers=hidden_layers, scale_bound=bound).double()
    flow.data_init(1.5 * torch.randn(512, 2, dtype=torch.float64) + 0.3)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for coupling in flow.transforms[2::3]:
            if bound < math.inf:  # raw + 2 near -2: log s on both sides of the floor
                coupling.out.bias[1] -= 4.0
    perms = {tuple(lu.perm.argmax(1).tolist()) for lu in flow.transforms[1::3]}
    assert perms == {(0, 1), (1, 0)}
    if bound == 2.0:
        _, log_s = flow.transforms[2]._shift_and_log_scale(points()[:, 1:])
        assert (log_s == -2.0).any() and (log_s > -2.0).any()
    assert_frozen_and_folded_match(flow)


def test_frozen_flow_is_a_snapshot():
    flow = make_flow("glow")
    x = points()
    frozen = flow.frozen()
    before = frozen.log_prob(x)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1)
    torch.testing.assert_close(frozen.log_prob(x), before, rtol=0, atol=0)
    assert not torch.allclose(flow.frozen().log_prob(x), before)


def test_folded_glow_refuses_a_flow_whose_data_init_is_pending():
    flow = Glow(n_steps=1, width=4)
    for module in flow.modules():
        if hasattr(module, "init_pending"):
            module.init_pending = True
    with pytest.raises(RuntimeError, match="data-dependent init"):
        flow.folded()


# --- the spline flow ----------------------------------------------------------------------------


def perturbed_coupling(flip: bool = False, dim: int = 2, scale: float = 0.5) -> RQSplineCoupling:
    torch.manual_seed(3)
    coupling = RQSplineCoupling(dim=dim, bins=5, hidden=8, tail_bound=3.0, flip=flip).double()
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(scale * torch.randn_like(p))
    return coupling


def test_the_perturbed_spline_of_the_property_tests_is_far_from_the_identity():
    # The property tests above would pass for the identity: the spline they test is not it.
    flow = make_flow("spline")
    x = points(256)
    z, log_det = flow(x)
    assert (z - x).abs().max() > 0.5 and log_det.abs().max() > 0.5


def test_spline_starts_as_the_identity():
    torch.manual_seed(0)
    flow = Spline(n_layers=4, bins=8, hidden=16).double()
    x = 3 * torch.randn(256, 2, dtype=torch.float64)
    z, log_det = flow(x)
    torch.testing.assert_close(z, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros_like(log_det), atol=1e-12, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_spline_tails_pass_through_with_log_det_zero(flip):
    coupling = perturbed_coupling(flip)
    t = 0 if flip else 1  # the transformed coordinate
    x = torch.randn(64, 2, dtype=torch.float64)
    x[:, t] = torch.cat([3.0 + torch.rand(32), -3.0 - 5 * torch.rand(32)]).double()
    for direction in (coupling.forward, coupling.inverse):
        y, log_det = direction(x)
        assert torch.equal(y, x)
        assert torch.equal(log_det, torch.zeros(64, dtype=torch.float64))
    # And the whole flow, with every coordinate outside every coupling's bound.
    flow = make_flow("spline")
    far = torch.tensor([[6.0, -7.5], [-30.0, 5.5], [5.01, 5.01]], dtype=torch.float64)
    for direction in (flow.forward, flow.inverse):
        y, log_det = direction(far)
        assert torch.equal(y, far) and torch.equal(log_det, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("flip", [False, True])
def test_spline_is_monotone_continuous_and_maps_the_interval_onto_itself(flip):
    coupling = perturbed_coupling(flip)
    t = 0 if flip else 1
    grid = torch.linspace(-4.0, 4.0, 20_001, dtype=torch.float64)  # across both tails
    for cond in (-1.0, 0.3, 2.5):
        x = torch.full((grid.numel(), 2), cond, dtype=torch.float64)
        x[:, t] = grid
        z, log_det = coupling(x)
        assert torch.equal(z[:, 1 - t], x[:, 1 - t])
        steps = z[:, t].diff()
        assert (steps > 0).all()  # strictly increasing
        # Continuous, tails included: no step much larger than the largest slope allows.
        assert steps.max() <= 1.01 * log_det.exp().max() * grid.diff().max()
        bounds = torch.tensor([-3.0, 3.0], dtype=torch.float64)
        ends = torch.full((2, 2), cond, dtype=torch.float64)
        ends[:, t] = bounds
        torch.testing.assert_close(coupling(ends)[0][:, t], bounds, atol=1e-12, rtol=0)
    # Not the identity: the test bends it.
    assert (z[:, t] - grid).abs().max() > 0.1


@VMAP_SEARCHSORTED
def test_spline_in_more_dimensions_is_invertible_with_exact_log_det():
    torch.manual_seed(2)
    flow = Spline(n_layers=3, bins=4, hidden=8, dim=5).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = 2 * torch.randn(16, 5, dtype=torch.float64)
    z, log_det = flow(x)
    x_back, log_det_back = flow.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(
        log_det + log_det_back, torch.zeros_like(log_det), atol=1e-10, rtol=0
    )
    jac = vmap(jacrev(lambda row: flow(row[None])[0][0]))(x)
    torch.testing.assert_close(
        log_det, torch.linalg.slogdet(jac).logabsdet, atol=1e-10, rtol=1e-10
    )
    # Each coupling keeps dim // 2 coordinates and moves the others; together, they move all.
    inside = 4 * torch.rand(16, 5, dtype=torch.float64) - 2
    moved = set()
    for coupling in flow.transforms:
        changed = (coupling(inside)[0] != inside).all(0)
        assert changed.sum() == 5 - 5 // 2
        moved |= set(changed.nonzero().flatten().tolist())
    assert moved == set(range(5))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_layers=0),
        dict(bins=0),
        dict(hidden=0),
        dict(hidden_layers=0),
        dict(dim=1),
        dict(tail_bound=0.0),
        dict(tail_bound=math.inf),
        dict(bins=1000),  # bins * the least bin share (1e-3) must stay below 1
    ],
)
def test_spline_refuses_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        Spline(**kwargs)


# --- the spline's maths against a plain reference -------------------------------------------


def reference_coupling(
    coupling: RQSplineCoupling,
    x: torch.Tensor,
    inverse: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """``coupling`` (or its inverse), written plainly from the maths (the module's docstring;
    Durkan et al. 2019) in the old batch-major layout, in ``dtype``: softmax widths and heights
    with a floor, knots by cumulative sums, softplus derivatives, the bin by comparisons, the
    forward formula and the quadratic's root. Differentiable by autograd."""
    import torch.nn.functional as F

    net = coupling.net
    k, bound = coupling.bins, coupling.tail_bound
    floor, floor_d = coupling.min_bin, coupling.min_derivative
    x = x.to(dtype)
    t = coupling.n_transformed
    cols = torch.arange(coupling.dim)
    transformed = cols < t if coupling.flip else cols >= coupling.dim - t
    cond, x_t = x[:, ~transformed], x[:, transformed]
    h = cond
    for i, layer in enumerate(net[::2]):
        h = F.linear(torch.relu(h) if i else h, layer.weight.to(dtype), layer.bias.to(dtype))
    raw = h.reshape(len(x), t, 3 * k - 1)

    def knots(logits):
        sizes = 2 * bound * (floor + (1 - k * floor) * torch.softmax(logits, -1))
        inner = -bound + torch.cumsum(sizes, -1)[..., :-1]
        ends = torch.full_like(inner[..., :1], bound)
        return torch.cat([-ends, inner, ends], -1)

    knots_x, knots_y = knots(raw[..., :k]), knots(raw[..., k : 2 * k])
    shift = math.log(math.expm1(1.0 - floor_d))
    ones = torch.ones_like(raw[..., :1])
    derivs = torch.cat([ones, F.softplus(raw[..., 2 * k :] + shift) + floor_d, ones], -1)
    v = x_t.clamp(-bound, bound)
    source = knots_y if inverse else knots_x
    b = (v.unsqueeze(-1) >= source[..., 1:-1]).sum(-1, keepdim=True)

    def at(table, offset=0):
        return table.gather(-1, b + offset).squeeze(-1)

    x_k, y_k, d_k = at(knots_x), at(knots_y), at(derivs)
    w, hgt, d_k1 = at(knots_x, 1) - x_k, at(knots_y, 1) - y_k, at(derivs, 1)
    s = hgt / w
    if inverse:
        a = hgt * (s - d_k) + (v - y_k) * (d_k1 + d_k - 2 * s)
        b_ = hgt * d_k - (v - y_k) * (d_k1 + d_k - 2 * s)
        c = -s * (v - y_k)
        xi = 2 * c / (-b_ - torch.sqrt(b_**2 - 4 * a * c))
    else:
        xi = (v - x_k) / w
    den = s + (d_k1 + d_k - 2 * s) * xi * (1 - xi)
    grad = s**2 * (d_k1 * xi**2 + 2 * s * xi * (1 - xi) + d_k * (1 - xi) ** 2) / den**2
    if inverse:
        y = x_k + xi * w
        log_grad = -torch.log(grad)
    else:
        y = y_k + hgt * (s * xi**2 + d_k * xi * (1 - xi)) / den
        log_grad = torch.log(grad)
    inside = (x_t >= -bound) & (x_t <= bound)
    out = x.clone()
    out[:, transformed] = torch.where(inside, y, x_t)
    return out, torch.where(inside, log_grad, 0.0).sum(1)


def spline_test_points(
    coupling: RQSplineCoupling, n: int = 300, on_knots: bool = True
) -> torch.Tensor:
    """Points inside the bound, in both tails, at -B and B, and (``on_knots``) exactly at the
    knots."""
    torch.manual_seed(5)
    bound = coupling.tail_bound
    x = (2.6 * bound) * torch.rand(n, coupling.dim, dtype=torch.float64) - 1.3 * bound
    t = 0 if coupling.flip else 1
    x[:4, t] = torch.tensor([-bound, bound, -bound - 1.0, bound + 2.0])
    # Rows 4..: the transformed coordinate on a knot of its own spline, abscissa (forward)
    # and ordinate (inverse) alike: the knots are where the bin changes.
    for source in (0, 1) if on_knots else ():
        rows = slice(4 + 60 * source, 64 + 60 * source)
        with torch.no_grad():
            knots = spline_knots(coupling, x[rows])[source]
        pick = torch.arange(60) % (coupling.bins + 1)
        x[rows, t] = knots.gather(1, pick.unsqueeze(1)).squeeze(1)
    return x


def spline_knots(coupling: RQSplineCoupling, x: torch.Tensor):
    """The reference's knots (abscissae, ordinates), (n, K+1) each, for the rows of ``x``."""
    import torch.nn.functional as F

    k, bound, floor = coupling.bins, coupling.tail_bound, coupling.min_bin
    t = coupling.n_transformed
    cols = torch.arange(coupling.dim)
    transformed = cols < t if coupling.flip else cols >= coupling.dim - t
    h = x.double()[:, ~transformed]
    for i, layer in enumerate(coupling.net[::2]):
        h = F.linear(torch.relu(h) if i else h, layer.weight.double(), layer.bias.double())
    raw = h.reshape(len(x), t, 3 * k - 1)[:, 0]
    out = []
    for logits in (raw[:, :k], raw[:, k : 2 * k]):
        sizes = 2 * bound * (floor + (1 - k * floor) * torch.softmax(logits, -1))
        out.append(F.pad(-bound + torch.cumsum(sizes, -1)[:, :-1], (1, 1)))
        out[-1][:, 0], out[-1][:, -1] = -bound, bound
    return out


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", [0.2, 0.5])
def test_spline_equals_a_plain_reference_to_float_rounding(flip, inverse, scale):
    # The fast spline is the same function as the maths written plainly, tails and knots
    # included. For a spline of slopes up to about 6 (scale 0.2): to 1e-12 in float64 and
    # 1e-5 in float32 (what training runs). For one of slopes up to about 1,000 (scale 0.5,
    # where rounding a knot moves log g' by 1e-4 in float32): to 1e-9 in float64, and in
    # float32 to 1e-4 and 1e-3 (the old batch-major code's errors were 3e-5 and 6e-4), or, at
    # a point where it is larger, to twice the error of the plain maths run in float32 at that
    # point: on an AMD EPYC the plain inverse's log g' is 0.017 off at a point on a knot of a
    # bin 0.01 high and 1.8 wide (the knots' rounding, not the formula, limits float32 there).
    coupling = perturbed_coupling(flip, scale=scale)
    x = spline_test_points(coupling)
    expected = reference_coupling(coupling, x, inverse)
    plain32 = reference_coupling(coupling, x, inverse, torch.float32)

    def per_point(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        error = (value.double() - exact).abs()
        return error.amax(1) if error.dim() == 2 else error

    assert (expected[0] - x).abs().max() > 0.5  # the spline bends these points
    tolerances = {
        (0.2, torch.float64): (1e-12, 1e-12),
        (0.2, torch.float32): (1e-5, 1e-5),
        (0.5, torch.float64): (1e-9, 1e-9),
        (0.5, torch.float32): (1e-4, 1e-3),
    }
    for dtype in (torch.float64, torch.float32):
        model = coupling.to(dtype)
        direction = model.inverse if inverse else model.forward
        got = direction(x.to(dtype))
        for fast, exact, plain, tol in zip(
            got, expected, plain32, tolerances[scale, dtype], strict=True
        ):
            bound = torch.full((len(x),), tol, dtype=torch.float64)
            if dtype == torch.float32:
                bound = bound.maximum(2 * per_point(plain, exact))
            assert (per_point(fast, exact) < bound).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_gradient_in_closed_form_equals_autograd_of_the_reference(inverse):
    # The spline's backward is written by hand: it must be autograd's gradient of the plain
    # maths, for the inputs and every parameter, tails included. (Not at a knot: there the
    # log-det's derivative jumps, and which side a point falls on is a matter of rounding.)
    coupling = perturbed_coupling(flip=True, dim=3)
    x = spline_test_points(coupling, n=200, on_knots=False).requires_grad_()
    weights = torch.randn(200, 3, dtype=torch.float64)

    def loss(fn):
        out, log_det = fn(x)
        return (out * weights).sum() + (log_det * weights[:, 0]).sum()

    params = [x, *coupling.parameters()]
    direction = coupling.inverse if inverse else coupling.forward
    got = torch.autograd.grad(loss(direction), params)
    reference = loss(lambda v: reference_coupling(coupling, v, inverse))
    expected = torch.autograd.grad(reference, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_maths_passes_gradcheck(inverse):
    from fce.flows.rational_quadratic import rational_quadratic

    coupling = perturbed_coupling()
    constants = coupling._constants(torch.zeros((), dtype=torch.float64))
    torch.manual_seed(6)
    x = (8 * torch.rand(2, 30, dtype=torch.float64) - 4).requires_grad_()  # tails too
    raw = torch.randn(2 * (3 * coupling.bins - 1), 30, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, raw: rational_quadratic(x, raw, constants, inverse), (x, raw)
    )


def test_spline_checkpoints_keep_their_keys_and_shapes():
    # Checkpoints of the spline flow saved before the rewrite of its passes must load.
    shapes = {name: tuple(v.shape) for name, v in Spline().state_dict().items()}
    expected = {}
    for i in range(4):
        for layer, (rows, cols) in zip((0, 2, 4), ((64, 1), (64, 64), (23, 64)), strict=True):
            expected[f"transforms.{i}.net.{layer}.weight"] = (rows, cols)
            expected[f"transforms.{i}.net.{layer}.bias"] = (rows,)
    assert shapes == expected
