"""The lowmem-analyze command line."""
