"""Data stage: finding pairs, reading images, ``prepare`` into Parquet patch shards."""
