"""apikeyd benchmarks: how close a cached Authorize comes to the gRPC floor (an empty health Check),
what a cold Authorize costs, and whether concurrent cold checks of one key share one argon2 verification.

Run with `make bench`; `bench.run` says what each figure is and how it is measured.
"""
