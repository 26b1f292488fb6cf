"""Names the science and the torch-free edges share: what an evaluation logs.

At the bottom of the package, with no imports: ``fce.metrics`` orders its output by them and
the sweep's objective check (before torch loads) offers them.
"""

# What an evaluation logs (fce/metrics.py), in the order tables show them.
EVAL_METRICS = (
    "nll_ebm",
    "nll_flow",
    "nll_data",
    "kl_data_ebm",
    "kl_data_flow",
    "kl_ebm_data",
    "kl_flow_data",
    "kl_flow_data_se",
    "js_ebm_data",
    "js_flow_data",
    "tv_ebm",
    "mse_logp",
    "mse_logp_centered",
    "fisher_ebm",
    "logz_gap",
    "logz_se",
    "logz_ess",
    "logz_ais_se",
    "logz_ais_ess",
    "logz_ais_minus_is",
    "flow_step_share",
)
# What an evaluation reports for an estimator that never trains the EBM (flow_mle).
FLOW_METRICS = (
    "nll_flow",
    "nll_data",
    "kl_data_flow",
    "kl_flow_data",
    "kl_flow_data_se",
    "js_flow_data",
)
# What only an evaluation above 2-D reports (its EBM has no grid: fce/metrics.py); and what
# only a 2-D one does (the EBM normalised everywhere, on the grid).
ABOVE_2D_ONLY = (
    "fisher_ebm",
    "logz_se",
    "logz_ess",
    "logz_ais_se",
    "logz_ais_ess",
    "logz_ais_minus_is",
)
GRID_ONLY = ("tv_ebm", "kl_ebm_data", "js_ebm_data")
# Above 2-D, what needs the estimated log Z: withheld where it is not trusted.
NEEDS_LOG_Z = ("nll_ebm", "kl_data_ebm", "logz_gap")
# What an evaluation reports for an estimator that never trains the flow (mle).
EBM_METRICS = (
    "nll_ebm",
    "nll_data",
    "kl_data_ebm",
    "kl_ebm_data",
    "js_ebm_data",
    "tv_ebm",
    "mse_logp",
    "mse_logp_centered",
    "fisher_ebm",
    "logz_gap",
    "logz_se",
    "logz_ess",
    "logz_ais_se",
    "logz_ais_ess",
    "logz_ais_minus_is",
)
