"""Benchmarks: pgpool_async side by side with its peers, speed and memory, in one run.

Run ``python -m benchmarks.run`` (``--help`` for the options). Modules:

- :mod:`benchmarks.contenders`: one class per pool under test, behind one interface;
- :mod:`benchmarks.drivers`: closed-loop and burst drivers (asyncio tasks or OS
  threads) with a 1 ms ticker that measures event-loop stalls;
- :mod:`benchmarks.workloads`: SELECT 1, overload, spike and checkout workloads;
- :mod:`benchmarks.realistic`: the realistic workloads' tables, statements and value check
  (one row by key, 100 rows, a write transaction);
- :mod:`benchmarks.memory`: resident-set growth, measured in a fresh subprocess;
- :mod:`benchmarks.machine`: what the figures were measured on;
- :mod:`benchmarks.report`: medians, ratios, tables and JSON;
- :mod:`benchmarks.profiling`: a profile of pgpool_async's ``connection()`` loop
  and its thread hops per operation.
"""
