"""`rtsc archive-qc`: the pipeline over an archive of series, in parallel on Dask."""
