"""How well the EBM and the flow learned the data density, on fixed held-out points.

Grid normalisation: the EBM's exp(-f) is integrated numerically over [-L, L]^2 on a regular
grid of cell centres (logsumexp plus the log cell area), which gives a normalised p_hat for
NLL and KL, and log Z to compare with the learned c.

Both directions of the KL divergence: KL(p_d || model) on the held-out points (mass-covering),
KL(model || p_d) on the grid for the EBM and on the flow's own samples for the flow
(mode-seeking), with the Jensen-Shannon divergence beside the latter, finite where the data's
density is zero (docs/method.md, Metrics).

Above two dimensions no grid can normalise the EBM: its log Z is estimated by importance
sampling from a proposal that includes the EBM's own modes (``ImportanceNormaliser``), or by
annealed importance sampling (``AnnealedNormaliser``), with the estimate's standard error and
the weights' effective sample size logged beside it, and the metrics that need it are not
reported where that size is below a floor. The scores that need no normaliser are always
reported: the centred log-density error and the Fisher divergence against the data's exact
score.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fce.data import Dataset, make_generator
from fce.ebm import EBM
from fce.flows import Flow, Gaussian
from fce.names import EVAL_METRICS


@dataclass(frozen=True)
class Grid:
    """Cell centres of a cells x cells grid over [-limit, limit]^2."""

    points: Tensor
    log_cell_area: float
    limit: float
    cells: int

    @classmethod
    def make(
        cls,
        limit: float = 4.0,
        cells: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Grid:
        width = 2 * limit / cells
        axis = -limit + width * (torch.arange(cells, dtype=torch.float64) + 0.5)
        # Row-major with x1 along columns, so points.view(cells, cells) is an image (row = x2).
        x2, x1 = torch.meshgrid(axis, axis, indexing="ij")
        points = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1).to(device, dtype)
        return cls(points, 2 * math.log(width), limit, cells)

    def log_integral(self, log_f: Tensor) -> Tensor:
        """log of the integral of exp(log_f) over the grid's square (midpoint rule)."""
        return torch.logsumexp(log_f.double(), dim=0) + self.log_cell_area


# Rows per forward pass in evaluation: one chunk's activations are alive at once, 1 MiB per
# hidden layer of width 128 at 2,048 rows (8 MiB at 16,384). At the default sizes (20,000
# points, 256 x 256 cells, both multiples of 8) the values are bitwise those of one pass on
# this CPU, whatever the chunk (tests/test_metrics.py).
EVAL_CHUNK = 2048


def _chunked(fn, x: Tensor, chunk: int = EVAL_CHUNK) -> Tensor:
    """``fn`` over the rows of ``x``, ``chunk`` rows at a time, into one output tensor.

    Each chunk's values are copied out and freed before the next chunk runs: kept alive for a
    final ``torch.cat``, these small tensors sat between the freed megabyte activations and
    fragmented the heap, growing the process by about 1 MiB per chunk.
    """
    if x.shape[0] <= chunk:
        return fn(x)
    out = None
    for start in range(0, x.shape[0], chunk):
        values = fn(x[start : start + chunk])
        if out is None:
            out = values.new_empty((x.shape[0], *values.shape[1:]))
        out[start : start + chunk] = values
    return out


LOG_2 = math.log(2.0)

# Metrics that may be +inf in a healthy run: KL(model || p_d) is infinite as soon as the model
# puts mass where the data's density is zero (checkerboard's empty squares), and every model
# here has a density that is positive everywhere. The trainer lets these through; NaN in them,
# or -inf, is still a divergence.
MAY_BE_INFINITE = ("kl_ebm_data", "kl_flow_data", "kl_flow_data_se")


DENSITY_VERSION = 1  # bump when a dataset's log_prob changes, to invalidate cached values


def cache_dir() -> Path:
    return Path(os.environ.get("FCE_CACHE_DIR", Path.home() / ".cache" / "fce"))


def true_log_prob(dataset: Dataset, points: Tensor) -> Tensor:
    """log p_d at ``points`` (float64, on their device), cached on disk by content.

    The spiral densities are numerical integrals (seconds for 20,000 points); a run, a sweep
    and the next run on the same points reuse them.
    """
    cpu = points.detach().to("cpu", torch.float64).contiguous()
    digest = hashlib.sha256(cpu.numpy().tobytes()).hexdigest()[:20]
    path = cache_dir() / f"{dataset.name}-v{DENSITY_VERSION}-{digest}.pt"
    try:
        return torch.load(path, weights_only=True).to(points.device)
    except Exception:  # absent or unreadable: compute it again
        pass
    values = dataset.log_prob(cpu)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(values, handle)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is no reason to fail a run
    return values.to(points.device)


@dataclass(frozen=True)
class LogZEstimate:
    """An importance-sampling estimate of log Z: the value, its standard error (delta method,
    sqrt((n / ess - 1) / n)) and the weights' effective sample size (sum w)^2 / sum w^2."""

    value: Tensor
    se: Tensor
    ess: Tensor


def _energy_and_gradient(energy, x: Tensor) -> tuple[Tensor, Tensor]:
    """``energy`` at the rows of ``x`` and its gradient there, by autograd with respect to the
    points alone (no graph kept, the energy's parameters' gradients untouched)."""
    point = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = energy(point)
        (grad,) = torch.autograd.grad(f.sum(), point)
    return f.detach(), grad


def _widened_gaussian(reference: Tensor, widen: float) -> Gaussian:
    """The Gaussian fitted to ``reference`` (double, on the CPU), its standard deviations
    times ``widen``: the part of both normalisers' proposals that reaches off the data."""
    fitted = Gaussian.fit(reference.detach().cpu().double()).transforms[0]
    return Gaussian(fitted.mean.data, widen * fitted.scale_tril.data)


def _estimate(log_w: Tensor) -> LogZEstimate:
    """log of the mean of the weights exp(log_w), with its standard error and their ESS."""
    n = log_w.shape[0]
    top = log_w.max()
    w = (log_w - top).exp()
    total = w.sum()
    value = total.log() + top - math.log(n)
    ess = total.square() / w.square().sum()
    se = ((n / ess - 1).clamp_min(0) / n).sqrt()
    return LogZEstimate(value, se, ess)


class ImportanceNormaliser:
    """log Z = log of the integral of exp(-f), by importance sampling.

    The proposal is defensive (Hesterberg, "Weighted average importance sampling and defensive
    mixture distributions", Technometrics 1995), a mixture of three parts:

    - the data's own density p_d (share w), which an EBM that learned it matches (its weights
      then stay below 1 / w);
    - a Gaussian fitted to the held-out points (mean m, covariance S) widened by s, which
      reaches the EBM's mass off the data (share (1 - w - v));
    - the EBM's own modes (share v): Gaussians at the minima of f that gradient descent finds
      from ``modes`` starting points (half held-out-like data points, half the Gaussian's), each
      with the covariance of f's Laplace approximation there (its Hessian's inverse, no wider
      than the widened Gaussian), widened by s. They reach mass an EBM puts where neither the
      data nor the Gaussian do: a narrow, deep mode between the data's, which a trained
      energy can grow where its contrast never sampled, holds tens of nats a fixed
      proposal would never see.

    The first two parts' points are drawn once, stratified (round(w n) of p_d), from the
    evaluation seed's ``eval/logz`` stream, with their densities; the modes' are the same
    fixed noise moved onto the modes found at each call. Every term of r is evaluated at
    every point, so the estimate is unbiased for Z whatever the modes are.

    Importance sampling still cannot see mass that neither its proposal nor the descent
    reaches; the effective sample size says when the weights are too uneven for the estimate
    to be trusted (``min_ess``: below it, no metric that needs log Z is reported).

    Args:
        dataset: the data's distribution (samples and exact ``log_prob``).
        reference: points of the data (the held-out ones) for the Gaussian's fit.
        n: proposal points.
        seed: the evaluation seed; the points come from its ``eval/logz`` stream.
        min_ess: the least effective sample size at which log Z is reported.
        data_share: w, the data's share of the proposal.
        widen: s, the Gaussian's standard deviations over the data's.
        modes: starting points of the descent (0: no modes' part).
        mode_share: v, the modes' share of the proposal.
        descent_steps: Adam steps of the descent.
    """

    def __init__(
        self,
        dataset: Dataset,
        reference: Tensor,
        n: int,
        seed: int = 0,
        min_ess: float = 100.0,
        data_share: float = 0.5,
        widen: float = 1.25,
        modes: int = 64,
        mode_share: float = 0.25,
        descent_steps: int = 300,
    ) -> None:
        if not (data_share > 0 and mode_share >= 0 and data_share + mode_share < 1):
            raise ValueError(
                f"data_share={data_share}, mode_share={mode_share}: must be positive "
                "shares of the proposal that leave the Gaussian some"
            )
        self.dataset, self.min_ess, self.widen = dataset, float(min_ess), widen
        self.device, self.dtype = reference.device, reference.dtype
        k_data, k_modes = round(data_share * n), round(mode_share * n) if modes else 0
        k_gaussian = n - k_data - k_modes
        if min(k_data, k_gaussian) < 1:
            raise ValueError(f"n={n}: too few points for every part of the proposal")
        # The parts' weights are the shares drawn (stratified sampling), exactly.
        self.log_shares = [
            math.log(k / n) if k else -math.inf for k in (k_data, k_gaussian, k_modes)
        ]
        generator = make_generator(seed, "eval/logz")
        from_data = dataset.sample(k_data, generator, torch.float64)
        self.gaussian = _widened_gaussian(reference, widen)
        mean, scale = (
            self.gaussian.transforms[0].mean.data,
            self.gaussian.transforms[0].scale_tril.data,
        )
        noise = torch.randn(k_gaussian, dataset.dim, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            points = torch.cat([from_data, self.gaussian.transform_noise(noise)[0]])
            log_g = self.gaussian.log_prob(points)
        log_p = true_log_prob(dataset, points).cpu()
        self.fixed = (points, log_p, log_g)
        self.points = points.to(self.device, self.dtype)
        self.log_proposal = self._mixture(log_p, log_g, None).to(self.device)  # without modes
        self.mode_noise = torch.randn(
            k_modes, dataset.dim, generator=generator, dtype=torch.float64
        )
        # The starts come from a stream of their own (r at the sample's points must not
        # depend on those points): half data points, a quarter the Gaussian's draws, a quarter
        # those draws pulled toward its mean (the first one onto it): in high dimension a
        # Gaussian draw is never near its own mode, so an energy contrasted with it is
        # unchecked there.
        starts = make_generator(seed, "eval/logz/starts")
        half, quarter = (modes // 2, modes // 4) if k_modes else (0, 0)
        drawn = self.gaussian.transform_noise(
            torch.randn(modes - half, dataset.dim, generator=starts, dtype=torch.float64)
        )[0].detach()
        pull = torch.linspace(0, 0.5, quarter, dtype=torch.float64).unsqueeze(1)
        drawn[:quarter] = mean + pull * (drawn[:quarter] - mean)
        self.starts = torch.cat([dataset.sample(half, starts, torch.float64), drawn])
        self.descent_steps = descent_steps
        variances = torch.linalg.eigvalsh(scale @ scale.T)
        self.least_precision = 1 / float(variances.max())  # no mode wider than the Gaussian
        self.descent_lr = 0.05 * float(variances.mean().sqrt()) / widen
        # the Hessian by central differences of the gradient, this far apart
        self.difference = 1e-2 * float(variances.mean().sqrt()) / widen

    def _mixture(self, log_p: Tensor, log_g: Tensor, log_m: Tensor | None) -> Tensor:
        parts = [log_p + self.log_shares[0], log_g + self.log_shares[1]]
        if log_m is not None:
            parts.append(log_m + self.log_shares[2])
        return torch.stack(parts).logsumexp(0)

    def find_modes(self, energy) -> tuple[Tensor, Tensor]:
        """Minima of ``energy`` from the starting points (Adam on the points, the EBM left
        untouched), and the Cholesky factors of their Laplace covariances, widened; both
        double, on the CPU. The Hessian is the central difference of the gradient (any
        energy whose first derivative is right, a flow's custom backward included); a start
        whose descent ends off the finite numbers is dropped."""
        x = self.starts.to(self.device, self.dtype).clone().requires_grad_(True)
        descent = torch.optim.Adam([x], lr=self.descent_lr)
        for _ in range(self.descent_steps):
            x.grad = _energy_and_gradient(energy, x)[1]
            descent.step()
        x = x.detach()
        dim, h = x.shape[1], self.difference
        columns = []
        for i in range(dim):
            shift = torch.zeros_like(x)
            shift[:, i] = h
            ahead = _energy_and_gradient(energy, x + shift)[1]
            behind = _energy_and_gradient(energy, x - shift)[1]
            columns.append((ahead - behind).double().cpu() / (2 * h))
        hessian = torch.stack(columns, 2)
        hessian = 0.5 * (hessian + hessian.transpose(1, 2))
        x = x.cpu().double()
        finite = x.isfinite().all(1) & hessian.isfinite().all(2).all(1)
        if not finite.any():
            raise ValueError("no descent of the energy ended at finite numbers")
        x, hessian = x[finite], hessian[finite]
        values, vectors = torch.linalg.eigh(hessian)
        values = values.clamp(self.least_precision, 1e8)  # no wider than the Gaussian
        cov = (vectors / values.unsqueeze(1)) @ vectors.transpose(1, 2) * self.widen**2
        return x, torch.linalg.cholesky(cov)

    @staticmethod
    def _log_modes(points: Tensor, means: Tensor, trils: Tensor, weights: Tensor) -> Tensor:
        """log of the mixture of N(means[k], trils[k] trils[k]^T), weights[k] each, at
        ``points``."""
        dim = points.shape[1]
        log_w = weights.log() - trils.diagonal(dim1=1, dim2=2).log().sum(1)
        out = []
        for start in range(0, points.shape[0], 1024):
            part = points[start : start + 1024]
            centred = (part.unsqueeze(0) - means.unsqueeze(1)).transpose(1, 2)  # (K, d, n)
            z = torch.linalg.solve_triangular(trils, centred, upper=False)
            out.append((-0.5 * z.square().sum(1) + log_w.unsqueeze(1)).logsumexp(0))
        return torch.cat(out) - 0.5 * dim * math.log(2 * math.pi)

    def proposal(self, energy) -> tuple[Tensor, Tensor]:
        """The points and log r at them, the modes' part placed on ``energy``'s minima."""
        if not self.mode_noise.shape[0]:
            return self.points, self.log_proposal
        means, trils = self.find_modes(energy)
        count = self.mode_noise.shape[0]
        which = torch.arange(count) % means.shape[0]  # stratified: each mode its share
        weights = torch.bincount(which, minlength=means.shape[0]).double() / count
        moved = means[which] + (trils[which] @ self.mode_noise.unsqueeze(-1)).squeeze(-1)
        fixed, log_p_fixed, log_g_fixed = self.fixed
        points = torch.cat([fixed, moved])
        with torch.no_grad():
            log_g = torch.cat([log_g_fixed, self.gaussian.log_prob(moved)])
            log_p = torch.cat([log_p_fixed, _chunked(self.dataset.log_prob, moved)])
        log_r = self._mixture(log_p, log_g, self._log_modes(points, means, trils, weights))
        return points.to(self.device, self.dtype), log_r.to(self.device)

    def _log_weights(self, energy) -> tuple[Tensor, Tensor]:
        points, log_r = self.proposal(energy)
        with torch.no_grad():
            return points, -_chunked(energy, points).double() - log_r

    def __call__(self, energy) -> LogZEstimate:
        """The estimate of log of the integral of exp(-energy(x))."""
        return _estimate(self._log_weights(energy)[1])

    def trusted(self, estimate: LogZEstimate) -> bool:
        return bool(estimate.ess >= self.min_ess)

    def weights(self, energy) -> tuple[Tensor, Tensor]:
        """The points and their self-normalised weights (they sum to 1): resampling them
        draws approximately from the normalised EBM (for figures)."""
        points, log_w = self._log_weights(energy)
        return points, torch.softmax(log_w, dim=0)


class AnnealedNormaliser:
    """log Z = log of the integral of exp(-f), by annealed importance sampling (Neal,
    "Annealed importance sampling", Statistics and Computing 2001): where importance
    sampling's weights are too uneven, a path of distributions from a known one to the EBM.

    Chains start at g, the Gaussian fitted to the held-out points widened by s (its log Z
    known), and pass through pi_b = g^(1 - b) exp(-b f) for b on the sigmoid schedule of
    Grosse, Maddison and Salakhutdinov ("Annealing between distributions by averaging
    moments", NeurIPS 2013) from 0 to 1, with one Metropolis-adjusted Langevin (MALA)
    transition at each b, which leaves pi_b invariant. A chain's log-weight is the sum over
    the schedule of (b_t - b_(t-1)) (-f(x) - log g(x)) at its state before the t-th
    transition; the weights' mean estimates Z without bias, and its log is the estimate, with
    the same standard error and effective sample size as ``ImportanceNormaliser``'s.

    The step size at each b is fixed before the chains run, by a pilot of ``pilot`` chains
    that tunes it toward MALA's optimal acceptance rate (0.574, Roberts and Rosenthal 1998):
    no chain's kernel depends on the chains' own path, so the weights stay valid. Every call
    draws its chains and the pilot's afresh from the evaluation seed's ``eval/ais`` and
    ``eval/ais/pilot`` streams:
    an evaluation is a function of the EBM alone, and a resumed run logs what an
    uninterrupted one does.

    Args:
        reference: points of the data (the held-out ones) for the Gaussian's fit.
        chains: the chains whose weights make the estimate.
        steps: temperatures b_1 .. b_T of the schedule (one transition at each).
        seed: the evaluation seed.
        min_ess: the least effective sample size at which log Z is reported.
        widen: s, the Gaussian's standard deviations over the data's.
        pilot: the pilot's chains.
    """

    TARGET_ACCEPTANCE = 0.574

    def __init__(
        self,
        reference: Tensor,
        chains: int,
        steps: int,
        seed: int = 0,
        min_ess: float = 100.0,
        widen: float = 1.25,
        pilot: int = 256,
    ) -> None:
        self.chains, self.steps, self.seed, self.pilot = chains, steps, seed, pilot
        self.min_ess = float(min_ess)
        self.device, self.dtype = reference.device, reference.dtype
        # the chains live on the CPU in double
        gaussian = _widened_gaussian(reference, widen).transforms[0]
        self.mean, self.scale_tril = gaussian.mean.data, gaussian.scale_tril.data
        dim = reference.shape[1]
        self.log_norm = self.scale_tril.diagonal().log().sum() + 0.5 * dim * math.log(2 * math.pi)
        # MALA's step size for a Gaussian scales as its variance times d^(-1/3); the pilot
        # tunes it from there.
        self.first_step = float(self.scale_tril.diagonal().square().mean()) * dim ** (-1 / 3)
        t = torch.linspace(-4.0, 4.0, steps + 1, dtype=torch.float64)
        sigmoid = torch.sigmoid(t)
        self.betas = (sigmoid - sigmoid[0]) / (sigmoid[-1] - sigmoid[0])

    def _gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log g(x) and its gradient, in closed form."""
        centred = (x.double() - self.mean).T
        z = torch.linalg.solve_triangular(self.scale_tril, centred, upper=False)
        log_g = -0.5 * z.square().sum(0) - self.log_norm
        grad = -torch.linalg.solve_triangular(self.scale_tril.T, z, upper=True).T
        return log_g, grad

    def _state(self, energy, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """f(x), log g(x) and their gradients (double)."""
        f, grad_f = _energy_and_gradient(energy, x.to(self.device, self.dtype))
        log_g, grad_g = self._gaussian(x)
        return f.detach().cpu().double(), log_g, grad_f.cpu().double(), grad_g

    @torch.no_grad()
    def _run(self, energy, n: int, generator: torch.Generator, sizes: Tensor | None):
        """Anneal ``n`` chains; with ``sizes`` None, tune the step sizes as it goes (the
        pilot) and return them; otherwise return the log-weights."""
        dim = self.mean.shape[0]
        noise = torch.randn(n, dim, generator=generator, dtype=torch.float64)
        x = self.mean + noise @ self.scale_tril.T
        f, log_g, grad_f, grad_g = self._state(energy, x)
        log_w = torch.zeros(n, dtype=torch.float64)
        tuned, size = [], self.first_step
        for t in range(1, self.steps + 1):
            b, db = float(self.betas[t]), float(self.betas[t] - self.betas[t - 1])
            log_w += db * (-f - log_g)
            if t == self.steps and sizes is not None:
                break  # the weights are complete: no transition at b = 1 is needed
            eps = size if sizes is None else float(sizes[t - 1])
            drift = (1 - b) * grad_g - b * grad_f
            step = torch.randn(n, dim, generator=generator, dtype=torch.float64)
            proposal = x + eps * drift + math.sqrt(2 * eps) * step
            f2, log_g2, grad_f2, grad_g2 = self._state(energy, proposal)
            drift2 = (1 - b) * grad_g2 - b * grad_f2
            forward = (proposal - x - eps * drift).square().sum(1)
            backward = (x - proposal - eps * drift2).square().sum(1)
            log_ratio = ((1 - b) * (log_g2 - log_g) - b * (f2 - f)) + (forward - backward) / (
                4 * eps
            )
            uniform = torch.rand(n, generator=generator, dtype=torch.float64)
            accept = (uniform.log() < log_ratio) & log_ratio.isfinite()
            keep = accept.unsqueeze(1)
            x = torch.where(keep, proposal, x)
            f, log_g = torch.where(accept, f2, f), torch.where(accept, log_g2, log_g)
            grad_f, grad_g = torch.where(keep, grad_f2, grad_f), torch.where(keep, grad_g2, grad_g)
            if sizes is None:
                tuned.append(size)
                rate = accept.double().mean().item()
                size *= math.exp(2.0 * (rate - self.TARGET_ACCEPTANCE))
        return torch.tensor(tuned, dtype=torch.float64) if sizes is None else log_w

    def step_sizes(self, energy) -> Tensor:
        """The pilot's step size at each temperature."""
        generator = make_generator(self.seed, "eval/ais/pilot")
        return self._run(energy, min(self.pilot, self.chains), generator, None)

    def log_weights(self, energy) -> Tensor:
        """The chains' log-weights (the pilot run first)."""
        sizes = self.step_sizes(energy)
        return self._run(energy, self.chains, make_generator(self.seed, "eval/ais"), sizes)

    def __call__(self, energy) -> LogZEstimate:
        """The estimate of log of the integral of exp(-energy(x))."""
        return _estimate(self.log_weights(energy))

    def trusted(self, estimate: LogZEstimate) -> bool:
        return bool(estimate.ess >= self.min_ess)


def fisher_divergence(energy, points: Tensor, data_score: Tensor) -> Tensor:
    """1/2 E ||grad log p_theta(x) - grad log p_d(x)||^2 over ``points`` x ~ p_d: the EBM's
    score is -grad f (no normaliser enters it), ``data_score`` the data's exact one there."""
    out = points.new_zeros((), dtype=torch.float64)
    for start in range(0, points.shape[0], EVAL_CHUNK):
        _, grad = _energy_and_gradient(energy, points[start : start + EVAL_CHUNK])
        error = -grad.double() - data_score[start : start + EVAL_CHUNK]
        out = out + error.square().sum()
    return 0.5 * out / points.shape[0]


PANEL_FLOW_SAMPLES = 100_000  # the flow's samples of a marginal panel above 2-D


def log_histogram(points: Tensor, weights: Tensor | None, limit: float, cells: int) -> Tensor:
    """log of the density a (weighted) 2-D histogram of ``points`` gives on a cells x cells
    grid over [-limit, limit]^2, rows along the second coordinate (an image); -inf where a
    cell is empty. The weights (or counts) are normalised over all points, so mass outside
    the square is not shown as mass inside it."""
    width = 2 * limit / cells
    weights = points.new_ones(points.shape[0], dtype=torch.float64) if weights is None else weights
    index = torch.floor((points.double() + limit) / width).long()
    inside = ((index >= 0) & (index < cells)).all(1)
    flat = index[inside, 1] * cells + index[inside, 0]
    mass = weights.new_zeros(cells * cells).index_add_(0, flat, weights.double()[inside])
    return (mass / (weights.double().sum() * width**2)).log().view(cells, cells)


def _sample_columns(flow: Flow, z: Tensor) -> tuple[Tensor, Tensor]:
    """The flow's samples g(z) and their log q as columns, to go through ``_chunked``."""
    y, log_q = flow.transform_noise(z)
    return y, log_q.unsqueeze(1)


class Evaluator:
    """The metrics of an (EBM, flow) pair on fixed held-out points (docs/method.md, Metrics).

    Metrics (nats):
        nll_ebm            test NLL of the grid-normalised EBM p_hat.
        nll_flow           exact test NLL of the flow.
        logz_gap           c - log Z_grid: how far the learned c is from the EBM's normaliser.
    and where the dataset has a density (all six do):
        nll_data           test NLL of the data density itself: the floor of the two above.
        kl_data_ebm        KL(p_d || p_hat) = mean log p_d(x) - log p_hat(x).
        kl_data_flow       KL(p_d || q) = mean log p_d(x) - log q(x).
        kl_ebm_data        KL(p_hat || p_d) on the grid: sum p_hat (log p_hat - log p_d) h^2.
        kl_flow_data       KL(q || p_d) = mean log q(y) - log p_d(y) over y ~ q.
        kl_flow_data_se    the Monte-Carlo standard error of kl_flow_data.
        js_ebm_data        Jensen-Shannon divergence of p_hat and p_d on the grid, in
                           [0, log 2].
        js_flow_data       Jensen-Shannon divergence of q and p_d: the held-out points and
                           the flow's samples, in [0, log 2].
        mse_logp           mean (log p_theta(x) - log p_d(x))^2 with the learned c.
        mse_logp_centered  the variance of log p_theta(x) - log p_d(x): the shape error alone,
                           which a wrong c cannot inflate.
        tv_ebm             total variation between p_hat and p_d on the grid.

    Above two dimensions (``grid`` None) the EBM's metrics are instead:
        mse_logp, mse_logp_centered   as above.
        fisher_ebm         1/2 E_d ||grad log p_theta - grad log p_d||^2 on the first
                           ``score_points`` held-out points, where the data has a score
                           (also in 2-D with ``fisher=True``; None: above 2-D only).
        logz_ess, logz_se  the effective sample size of ``normaliser``'s weights and the
                           standard error of its log Z.
        logz_ais_ess, logz_ais_se   the same of ``annealer``'s estimate, where one is given,
                           and logz_ais_minus_is its log Z less importance sampling's.
        nll_ebm, kl_data_ebm, logz_gap   as above with the larger of the log Z estimates
                           whose ESS reaches the floor; none where neither does.

    The flow's samples y come from base noise drawn once, from ``seed``'s own stream: the
    same noise at every evaluation, as the held-out points are the same, so the training's
    random streams are never touched and a resumed run logs what an uninterrupted one does.
    ``n_flow_samples`` defaults to the number of held-out points.
    """

    def __init__(
        self,
        dataset: Dataset,
        eval_points: Tensor,
        grid: Grid | None,
        seed: int = 0,
        n_flow_samples: int | None = None,
        normaliser: ImportanceNormaliser | None = None,
        score_points: int = 4096,
        panel_limit: float = 4.0,
        fisher: bool | None = None,
        annealer: AnnealedNormaliser | None = None,
    ) -> None:
        self.annealer = annealer
        self.dataset = dataset
        self.eval_points = eval_points
        self.grid = grid
        self.seed = seed
        self.normaliser = normaliser
        self.panel_limit = grid.limit if grid is not None else panel_limit
        self.panel_noise = None
        self.data_score = None
        if fisher is None:  # by default above 2-D, where no grid scores the EBM's shape
            fisher = grid is None
        if fisher and dataset.has_score:
            points = eval_points[:score_points].detach().cpu().double()
            self.data_score = dataset.score(points).to(eval_points.device)
        self.log_p_true = None
        self.log_p_true_grid = None
        self.p_true_grid = None
        self.flow_noise = None
        if dataset.has_log_prob:
            self.log_p_true = true_log_prob(dataset, eval_points)
            if grid is not None:
                self.log_p_true_grid = true_log_prob(dataset, grid.points)
                self.p_true_grid = self.log_p_true_grid.exp()
            n = eval_points.shape[0] if n_flow_samples is None else n_flow_samples
            noise = torch.randn(
                n, eval_points.shape[1], generator=make_generator(seed, "eval/flow")
            )
            self.flow_noise = noise.to(eval_points.device)

    @torch.no_grad()
    def __call__(self, ebm: EBM | None, flow: Flow | None) -> dict[str, float]:
        """The metrics of ``ebm`` and ``flow``; with ``ebm=None``, the flow's alone (nll_flow,
        and nll_data, kl_data_flow where the dataset has a density): for a run that trains
        no EBM; with ``flow=None``, the EBM's alone (and nll_data): for one that trains no
        flow."""
        if ebm is None and flow is None:
            raise ValueError("nothing to evaluate: both ebm and flow are None")
        x = self.eval_points
        values = {}
        if self.log_p_true is not None:
            values["nll_data"] = -self.log_p_true.mean()
        if flow is not None:
            log_q = _chunked(flow.log_prob, x).double()
            values["nll_flow"] = -log_q.mean()
            if self.log_p_true is not None:
                values["kl_data_flow"] = values["nll_flow"] + self.log_p_true.mean()
                values |= self._flow_reverse(flow, log_q)
        if ebm is not None:
            values |= self._ebm_metrics(ebm)
        values = {name: values[name] for name in EVAL_METRICS if name in values}
        # One device-to-host transfer for all of them.
        numbers = torch.stack(list(values.values())).tolist()
        return dict(zip(values, numbers, strict=True))

    def _ebm_metrics(self, ebm: EBM) -> dict[str, Tensor]:
        if self.grid is None:
            return self._ebm_metrics_sampled(ebm)
        x = self.eval_points
        neg_energy_grid = -_chunked(ebm.energy, self.grid.points)
        log_z_grid = self.grid.log_integral(neg_energy_grid)
        # One pass of the EBM over x: log p_theta = -f - c, the same ops as ``ebm(x)``.
        neg_energy = -_chunked(ebm.energy, x)
        log_p_ebm = neg_energy - ebm.log_z
        log_p_hat = neg_energy.double() - log_z_grid
        values = {
            "nll_ebm": -log_p_hat.mean(),
            "logz_gap": ebm.log_z.double() - log_z_grid,
        }
        if self.log_p_true is not None:
            log_p_true = self.log_p_true
            error = log_p_ebm.double() - log_p_true
            values["kl_data_ebm"] = values["nll_ebm"] + log_p_true.mean()
            values["mse_logp"] = error.pow(2).mean()
            values["mse_logp_centered"] = error.var(unbiased=False)
            if self.data_score is not None:
                values["fisher_ebm"] = self._fisher(ebm)
            log_p_hat_grid = neg_energy_grid.double() - log_z_grid
            p_hat_grid = log_p_hat_grid.exp()
            cell_area = math.exp(self.grid.log_cell_area)
            values["tv_ebm"] = 0.5 * (p_hat_grid - self.p_true_grid).abs().sum() * cell_area
            values |= self._ebm_reverse(log_p_hat_grid, p_hat_grid, cell_area)
        return values

    def _fisher(self, ebm: EBM) -> Tensor:
        points = self.eval_points[: self.data_score.shape[0]]
        return fisher_divergence(ebm.energy, points, self.data_score)

    def _ebm_metrics_sampled(self, ebm: EBM) -> dict[str, Tensor]:
        """The EBM's metrics without a grid (see the class): its log Z by importance
        sampling, reported where the weights allow it."""
        x = self.eval_points
        neg_energy = -_chunked(ebm.energy, x)
        values = {}
        if self.log_p_true is not None:
            error = (neg_energy - ebm.log_z).double() - self.log_p_true
            values["mse_logp"] = error.pow(2).mean()
            values["mse_logp_centered"] = error.var(unbiased=False)
        if self.data_score is not None:
            values["fisher_ebm"] = self._fisher(ebm)
        if self.normaliser is not None:
            estimate = self.normaliser(ebm.energy)
            values["logz_ess"] = estimate.ess
            values["logz_se"] = estimate.se
            trusted = self.normaliser.trusted(estimate)
            if self.annealer is not None:
                annealed = self.annealer(ebm.energy)
                values["logz_ais_ess"] = annealed.ess
                values["logz_ais_se"] = annealed.se
                values["logz_ais_minus_is"] = annealed.value - estimate.value
                # Both estimate Z without bias and miss only mass they never reach, so each
                # log is low where it errs: the larger trusted one is reported.
                if self.annealer.trusted(annealed) and (
                    not trusted or annealed.value > estimate.value
                ):
                    estimate, trusted = annealed, True
            if trusted:
                values["nll_ebm"] = estimate.value - neg_energy.double().mean()
                values["logz_gap"] = ebm.log_z.double() - estimate.value
                if self.log_p_true is not None:
                    values["kl_data_ebm"] = values["nll_ebm"] + self.log_p_true.mean()
        return values

    def _ebm_reverse(
        self, log_p_hat: Tensor, p_hat: Tensor, cell_area: float
    ) -> dict[str, Tensor]:
        """KL(p_hat || p_d) and JS(p_hat, p_d) by the midpoint rule on the grid.

        p_hat is the EBM normalised on the square and zero outside it, so both are integrals
        over the square alone, except for p_d's mass outside it, where the mixture is p_d / 2
        and JS gains (log 2) / 2 per unit of that mass. Cells where p_hat underflows to 0 add
        nothing (x log x -> 0); cells where p_d is 0 and p_hat is not make the KL +inf.
        """
        log_p_true = self.log_p_true_grid
        p_true = self.p_true_grid
        zero = p_hat.new_zeros(())
        kl = torch.where(p_hat > 0, p_hat * (log_p_hat - log_p_true), zero).sum() * cell_area
        log_mixture = torch.logaddexp(log_p_hat, log_p_true) - LOG_2
        to_hat = torch.where(p_hat > 0, p_hat * (log_p_hat - log_mixture), zero)
        to_true = torch.where(p_true > 0, p_true * (log_p_true - log_mixture), zero)
        outside = 1 - p_true.sum() * cell_area  # p_d's mass outside the square
        js = 0.5 * ((to_hat.sum() + to_true.sum()) * cell_area + outside * LOG_2)
        return {"kl_ebm_data": kl, "js_ebm_data": js}

    def _flow_reverse(self, flow: Flow, log_q_data: Tensor) -> dict[str, Tensor]:
        """KL(q || p_d) with its standard error, and JS(q, p_d), by Monte Carlo.

        KL: the mean of log q(y) - log p_d(y) over the flow's samples y, exact in expectation;
        +inf (and so its error) once a sample lands where p_d is 0. JS: half the mean of
        log 2q / (q + p_d) over the samples plus half the mean of log 2p_d / (q + p_d) over
        the held-out points (``log_q_data``, log q at them); each term is at most log 2.
        """
        z = self.flow_noise.to(next(flow.parameters()).dtype)
        # The folded passes (Glow's normalisations in its weights, made once) sample for less
        # than the training form and agree with it to float rounding (docs/method.md has the
        # measured cost of this evaluation); a flow whose data-dependent initialisation is
        # still to come has none yet.
        pending = any(getattr(m, "init_pending", False) for m in flow.modules())
        folded = flow if pending else flow.folded()
        # One output tensor per chunk: the sample's coordinates, then its log q.
        passes = _chunked(lambda c: torch.cat(_sample_columns(folded, c), dim=1), z)
        y, log_q = passes[:, :-1], passes[:, -1].double()
        log_p = self.dataset.log_prob(y.to("cpu", torch.float64)).to(log_q.device)
        excess = log_q - log_p
        n = excess.shape[0]
        kl = excess.mean()
        # Of a sample holding +inf the spread is NaN; the error of an infinite mean is inf.
        spread = excess.std() if n > 1 else kl.new_tensor(math.inf)
        se = torch.where(torch.isinf(kl), kl, spread / math.sqrt(n))
        to_flow = LOG_2 + log_q - torch.logaddexp(log_q, log_p)
        log_p_data = self.log_p_true
        to_data = LOG_2 + log_p_data - torch.logaddexp(log_p_data, log_q_data)
        js = 0.5 * (to_flow.mean() + to_data.mean())
        return {"kl_flow_data": kl, "kl_flow_data_se": se, "js_flow_data": js}

    @torch.no_grad()
    def panel_rows(
        self, ebm: EBM, flow: Flow, data: Tensor, pairs: int = 2, cells: int = 128
    ) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """(label, data points, log q, log p_hat) per row of a density panel, the densities
        (cells, cells) images on [-limit, limit]^2. In 2-D one row: the grid's exact
        densities. Above it one row per pair of coordinates (x1, x2), (x3, x4)... up to
        ``pairs``: the 2-D marginals, as histograms of the flow's samples (base noise drawn
        once, from ``seed``'s ``eval/panel`` stream) and of the normaliser's points weighted
        by the EBM's importance weights (an approximation whose quality logz_ess states)."""
        if self.grid is not None:
            log_q, log_p = self.grid_log_densities(ebm, flow)
            return [(self.dataset.name, data, log_q, log_p)]
        limit = self.panel_limit
        if self.panel_noise is None:
            generator = make_generator(self.seed, "eval/panel")
            noise = torch.randn(PANEL_FLOW_SAMPLES, self.dataset.dim, generator=generator)
            self.panel_noise = noise.to(self.eval_points.device, self.eval_points.dtype)
        samples = _chunked(lambda z: flow.transform_noise(z)[0], self.panel_noise)
        points, weights = None, None
        if self.normaliser is not None:
            points, weights = self.normaliser.weights(ebm.energy)
        rows = []
        for i in range(0, min(2 * pairs, self.dataset.dim), 2):
            columns = slice(i, i + 2)
            log_q = log_histogram(samples[:, columns], None, limit, cells)
            log_p = data.new_full((cells, cells), -math.inf, dtype=torch.float64)
            if weights is not None:
                log_p = log_histogram(points[:, columns], weights, limit, cells)
            label = f"{self.dataset.name}: x{i + 1}, x{i + 2}"
            rows.append((label, data[:, columns], log_q, log_p))
        return rows

    @torch.no_grad()
    def grid_log_densities(self, ebm: EBM, flow: Flow) -> tuple[Tensor, Tensor]:
        """(log q_flow, log p_hat_ebm) on the grid, each (cells, cells), for density panels."""
        log_q = _chunked(flow.log_prob, self.grid.points)
        neg_energy = -_chunked(ebm.energy, self.grid.points)
        log_p = neg_energy.double() - self.grid.log_integral(neg_energy)
        shape = (self.grid.cells, self.grid.cells)
        return log_q.view(shape), log_p.view(shape)
