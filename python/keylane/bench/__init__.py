"""keylane's benchmark workloads, runner, baselines and reports."""
