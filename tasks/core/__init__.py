"""What every stage shares: the executor and its key, shards and manifests, documents, versions,
the data-root lock, progress, held-out splits."""
