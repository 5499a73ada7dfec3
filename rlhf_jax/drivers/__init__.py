"""Several stages composed: the pipeline, the method comparison, improvement in rounds."""
