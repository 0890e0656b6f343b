"""The deployments llmflow serves (see pipeline_deployments)."""
