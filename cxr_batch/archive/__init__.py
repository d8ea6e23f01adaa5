"""Where files come from and where results go: local paths and s3:// through pyarrow's filesystems, archive listing, the Parquet results. No torch."""
