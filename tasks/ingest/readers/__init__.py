"""One reader per file format, as datatrove's ``pipeline/readers``: each module turns one kind of
file into documents (kept or rejected) and fetch failures, in file order.

:mod:`llmflow.tasks.ingest.file_sources` decides which files a seed names and which reader reads
each; :mod:`.common` holds what the readers share (rejections, body decoding, dates).
"""
