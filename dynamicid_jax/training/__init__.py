"""Two-stage DynamicID training (anchor, reconfig) on a (data, fsdp) device mesh.

`trainer.train(config, workdir, data_dir)` is the whole run; `checkpoints.load_trained_params`
reads a finished (or running) workdir back as a modeling-style params dict for sampling.
"""
