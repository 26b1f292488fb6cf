"""The baselines FCE is compared with: NCE against fixed noise, and the flow by maximum likelihood
(the EBM by maximum likelihood, estimator=mle, has tests/test_mle.py).

Known answers: on Gaussian data, NCE recovers the Gaussian's log-density *and* its
log-normaliser (c -> log Z), and the MLE flow recovers the Gaussian itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from fce.callbacks import Figures
from fce.config import FLOW_METRICS
from fce.data import Dataset
from fce.ebm import EBM
from fce.flows import Gaussian, Glow
from fce.metrics import Evaluator, Grid
from fce.trainer import LoopSettings, Trainer
from tests import helpers
from tests.helpers import TINY, run_cli, runs, store_uri

MEAN = torch.tensor([0.5, -0.3])
COV = torch.tensor([[0.8, 0.3], [0.3, 0.5]])
TRUTH = MultivariateNormal(MEAN, COV)


def gaussian_dataset() -> Dataset:
    def sample(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        z = torch.randn(n, 2, generator=gen, dtype=dtype)
        return MEAN.to(dtype) + z @ torch.linalg.cholesky(COV).to(dtype).T

    return Dataset("gaussian", sample, lambda x: TRUTH.log_prob(x.float()).to(x.dtype))


def make_trainer(estimator: str, flow, steps: int, lr_ebm: float = 3e-3) -> Trainer:
    torch.manual_seed(0)
    ds = gaussian_dataset()
    data = ds.sample(20_000, torch.Generator().manual_seed(1))
    evaluator = Evaluator(ds, ds.sample(4000, torch.Generator().manual_seed(2)), Grid.make())
    ebm = EBM(hidden=(32, 32))
    settings = LoopSettings(batch_size=500, epochs=1000, max_steps=steps, eval_every=100, seed=0)
    # NCE against the noise given here (noise=flow without a checkpoint: the flow as it is).
    options = {"noise": "flow", "noise_checkpoint": None} if estimator == "nce" else {}
    return helpers.make_trainer(
        estimator,
        ebm,
        flow,
        data,
        evaluator,
        settings,
        lr_ebm=lr_ebm,
        callbacks=[Figures(plot_every=0)],
        **options,
    )


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_fitted_gaussian_is_the_maximum_likelihood_gaussian():
    x = gaussian_dataset().sample(50_000, torch.Generator().manual_seed(3), torch.float64)
    noise = Gaussian.fit(x)
    fitted = MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    points = torch.randn(100, 2, dtype=torch.float64)
    torch.testing.assert_close(noise.log_prob(points), fitted.log_prob(points))
    samples, log_q = noise.sample_and_log_prob(7, torch.Generator().manual_seed(4))
    torch.testing.assert_close(log_q, fitted.log_prob(samples))
    assert not any(p.requires_grad for p in noise.parameters())


def test_nce_recovers_the_gaussian_log_density_and_its_normaliser():
    # Noise that is *not* the data distribution: wider and off-centre.
    noise = Gaussian(torch.tensor([-0.5, 0.5]), 1.5 * torch.eye(2))
    trainer = make_trainer("nce", noise, steps=1500, lr_ebm=1e-3)
    noise_before = snapshot(noise)
    ebm_before = snapshot(trainer.ebm)
    first = trainer.evaluator(trainer.ebm, trainer.flow)
    final = trainer.run()
    # log p_theta = -E - c against the true log-density, c included: shape and normaliser.
    assert final["mse_logp"] < 0.02 and first["mse_logp"] > 1.0
    assert final["kl_data_ebm"] < 0.01
    # c tracks log Z up to SGD noise of a few hundredths: average the last evaluations.
    gaps = trainer.history.history["logz_gap"][1][-5:]
    assert abs(sum(gaps) / len(gaps)) < 0.1
    assert trainer.estimator.flow_steps == 0 and final["flow_step_share"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(noise_before, snapshot(noise)))
    assert not all(torch.equal(a, b) for a, b in zip(ebm_before, snapshot(trainer.ebm)))


def test_flow_mle_recovers_the_gaussian_and_leaves_the_ebm_alone():
    flow = Glow(n_steps=2, width=16)
    trainer = make_trainer("flow_mle", flow, steps=600)
    ebm_before = snapshot(trainer.ebm)
    final = trainer.run()
    assert final["kl_data_flow"] < 0.01
    assert math.isclose(final["nll_flow"], final["nll_data"], abs_tol=0.01)
    # The EBM is never trained, so none of its metrics are reported.
    assert set(final) == {*FLOW_METRICS, "flow_step_share"}
    assert final["flow_step_share"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(ebm_before, snapshot(trainer.ebm)))
    losses = trainer.history.history["loss"][1]
    assert len(losses) == 600 and sum(losses[-50:]) < sum(losses[:50])


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["nce", "flow_mle", "mle"])
def test_run_py_logs_each_estimator_to_mlflow(tmp_path, estimator):
    uri = store_uri(tmp_path)
    done = run_cli([f"estimator={estimator}", *TINY, f"tracking.uri={uri}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    _, found = runs(uri)
    (run,) = found
    assert run.info.status == "FINISHED"
    assert run.data.params["estimator.name"] == estimator
    metrics = set(run.data.metrics)
    if estimator == "nce":
        assert {"nll_ebm", "mse_logp", "nll_flow", "value", "acc"} <= metrics
        assert run.info.run_name.startswith("8gaussians-nce-gaussian-s")
    elif estimator == "mle":
        assert {"nll_ebm", "kl_data_ebm", "mse_logp", "logz_gap", "value", "log_z"} <= metrics
        assert not metrics & {"nll_flow", "kl_data_flow", "acc"}
        assert run.info.run_name.startswith("8gaussians-ebm-mle-s")
    else:
        assert {"nll_flow", "kl_data_flow", "loss"} <= metrics
        assert not metrics & {"nll_ebm", "mse_logp", "value"}


@pytest.mark.slow
def test_nce_with_a_frozen_flow_from_a_checkpoint(tmp_path):
    uri = store_uri(tmp_path)
    common = [*TINY, f"tracking.uri={uri}", "flow.n_steps=2", "flow.width=16"]
    mle_dir = tmp_path / "mle"
    done = run_cli(["estimator=flow_mle", *common, f"hydra.run.dir={mle_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    nce = ["estimator=nce", "estimator.noise=flow", f"estimator.noise_checkpoint={mle_dir}"]
    done = run_cli([*nce, *common, f"hydra.run.dir={tmp_path / 'nce'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    client, found = runs(uri)
    by_estimator = {r.data.params["estimator.name"]: r for r in found}
    # The noise is the MLE flow, unchanged: the same flow metrics at every evaluation.
    mle_nll = by_estimator["flow_mle"].data.metrics["nll_flow"]
    history = client.get_metric_history(by_estimator["nce"].info.run_id, "nll_flow")
    assert [m.value for m in history] == pytest.approx([mle_nll] * len(history), abs=1e-6)

    # A flow of other sizes cannot load those weights: one line, no run created.
    other = [*nce, *TINY, f"tracking.uri={uri}", "flow.n_steps=3", "flow.width=16"]
    done = run_cli(other, cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: estimator.noise_checkpoint={mle_dir}: its flow is")
    )
    assert len(runs(uri)[1]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["estimator=mcmc"],
            "estimator=mcmc: unknown estimator; choose one of: fce, flow_mle, mle, nce",
        ),
        (
            ["estimator=mle", "estimator.grid_cells=0"],
            "estimator.grid_cells=0: must be a positive integer",
        ),
        (
            ["estimator=nce", "estimator.noise=uniform"],
            "estimator.noise='uniform': unknown; choose one of: gaussian, flow",
        ),
        (
            ["estimator=nce", "estimator.noise=flow"],
            "estimator.noise_checkpoint=None: estimator.noise=flow needs the checkpoint",
        ),
    ],
)
def test_bad_estimator_settings_are_one_line(tmp_path, args, message):
    done = run_cli([*args, *TINY, f"tracking.uri={store_uri(tmp_path)}"], cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("estimator", "objective", "message"),
    [
        (
            "flow_mle",
            "nll_ebm",
            "estimator=flow_mle trains no EBM; choose one of: nll_flow, nll_data, kl_data_flow, "
            "kl_flow_data, kl_flow_data_se, js_flow_data",
        ),
        (
            "mle",
            "nll_flow",
            "estimator=mle trains no flow; choose one of: nll_ebm, nll_data, kl_data_ebm, "
            "kl_ebm_data, js_ebm_data, tv_ebm, mse_logp, mse_logp_centered, fisher_ebm, "
            "logz_gap, logz_se, logz_ess, logz_ais_se, logz_ais_ess, logz_ais_minus_is",
        ),
    ],
)
def test_a_study_of_one_model_needs_an_objective_that_model_reports(
    tmp_path, estimator, objective, message
):
    args = [
        "sweep=threshold_lr",
        f"estimator={estimator}",
        f"sweep.objective={objective}",
        f"sweep.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tracking.uri={store_uri(tmp_path)}",
    ]
    done = run_cli(args, cwd=tmp_path, script="sweeps/tune.py")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: sweep.objective={objective}: {message}"


def test_a_checkpoint_saved_before_the_estimator_group_still_resumes(tmp_path):

    from fce import checkpoint
    from fce.compose import compose
    from fce.config import user_settings
    from fce.resume import load_resume

    cfg = compose([*TINY, f"train.resume={tmp_path / 'run'}"])
    old = user_settings(cfg)  # what fce wrote before the config nodes had targets ...
    del old["estimator"]  # ... and before estimators existed
    checkpoint.save(
        {"config": old, "trainer": {}, "mlflow_run_id": "x"}, tmp_path / "run" / "checkpoints", 5
    )
    resume = load_resume(cfg)
    assert resume is not None and resume.state["config"] == old
    # ... and only an FCE run may continue it.
    nce = compose([*TINY, "estimator=nce", f"train.resume={tmp_path / 'run'}"])
    with pytest.raises(
        ValueError, match=r"the checkpoint has estimator=\{'name': 'fce'"
    ) as refused:
        load_resume(nce)
    assert "this run estimator={'name': 'nce'" in str(refused.value)


def test_each_estimator_reports_its_own_flow_step_share_and_the_trainer_keeps_none():
    """The share of steps that moved the flow is the estimator's (``play``), saved in its
    state under the checkpoint key the trainer used to write, so old checkpoints load."""
    from fce.trainer import Trainer

    assert not hasattr(Trainer, "flow_step_share")
    for estimator, share in (("nce", 0.0), ("flow_mle", 1.0)):
        trainer = make_trainer(estimator, Glow(n_steps=2, width=16), steps=6)
        final = trainer.run()
        assert final["flow_step_share"] == share
        assert trainer.estimator.play(trainer.step) == {"flow_step_share": share}
        assert trainer.state_dict()["flow_steps"] == trainer.estimator.flow_steps
