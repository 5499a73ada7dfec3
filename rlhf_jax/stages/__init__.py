"""One module per stage, each `train(config, workdir)` around one pure step; `runs` reads the
hand-off of finished runs; `registry` maps a config's `stage` to its module and runs it."""
