"""Getting documents in: the web crawler, one reader per file format, HTML to text, WARC, embedded
sources."""
