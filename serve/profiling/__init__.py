"""Backend profiling behind `python -m serve.profile` and `python -m serve.report`: the
profile schema, roofline arithmetic, measurements and the comparison report. Kept in
`serve/`, outside the `dspark_jax` library (it uses matplotlib for the plots)."""
