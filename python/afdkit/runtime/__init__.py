"""afdkit.runtime: the AFD runtime (workers, pipeline, launcher) and its embedding API."""
