"""The corpus job: embed files of texts into parquet, resumable and exactly once, locally or on Ray Data (job.py)."""
