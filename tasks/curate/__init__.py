"""Curation: normalize, quality, dedup, toxicity and PII, each a shard stage."""
