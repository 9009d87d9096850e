"""Infrastructure that keeps runs and results honest, and knows nothing of the algorithm: the settings
of each script, checked once (`config`), the command line and its errors (`cli`), a training run's
safety (`training_run`, with `run_start`, `run_lock` and `training_log`), checkpoint files
(`checkpoints`), the machine (`runtime`), atomic writes (`atomic`) and the result files (`results`).
`config` and `cli` load without torch."""
