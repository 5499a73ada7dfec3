"""What people run: the `rlhf-jax` command line and the labelling web app."""
