"""The stages, grouped by phase: plain Python, usable and testable without Prefect.

``core`` holds what every stage shares (the executor, shards, documents, versions, the lock);
``ingest``, ``curate``, ``train`` and ``evaluate`` hold the stages of each phase.
"""
