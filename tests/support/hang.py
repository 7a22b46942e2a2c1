"""A ceiling for inputs that once took minutes (backtracking, quadratic expansion).

It catches a return of those algorithms, not a slowdown: the time each takes
is measured by benchmarks/bench_frontend.py, never asserted here.
"""

HANG_GUARD = 10.0  # seconds; each guarded call takes milliseconds, the old code minutes or hours
