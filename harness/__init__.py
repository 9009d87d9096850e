"""What keeps runs and results honest: the settings of each script, checked once (`config`), the
command line and its errors (`cli`), the run loop (`run_loop`), checkpoint files (`checkpoints`),
the machine (`runtime`), atomic writes (`atomic`) and the result files (`results`). `config` and
`cli` load without torch."""
